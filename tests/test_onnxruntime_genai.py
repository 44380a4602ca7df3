"""onnxruntime-genai as a runtime (runtimes/onnxruntime_genai.py): the folders `export onnx --variant ort` writes
run in genai's own generator, with every prompt position's logits, and agree with plain ONNX Runtime and with the
reference model; genai's own tokenizer agrees with tokenizer.json's."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime_genai")

from runtimes import RUNTIMES  # noqa: E402
from tests.conftest import assert_usage_error, run_cli  # noqa: E402
from toolkit.checkpoints import load_checkpoint  # noqa: E402
from toolkit.core.model import build_model  # noqa: E402
from toolkit.core.sampling import make_sampler  # noqa: E402
from toolkit.core.verify import VERIFY_TEXT, judge, verification_ids  # noqa: E402


@pytest.fixture(scope="module")
def folders(trained_model, tmp_path_factory):
    from exporters.onnx.exporter import export
    from exporters.onnx.quantize import quantize_onnx_folder

    base = tmp_path_factory.mktemp("genai")
    export(load_checkpoint(trained_model), base / "fp32", "ort", 20, True, False, 2)
    quantize_onnx_folder(base / "fp32", base / "int4", "int4", threads=2)
    return base


def test_genai_logits_equal_onnxruntime_and_pass_the_verifier(trained_model, folders):
    bundle = load_checkpoint(trained_model)
    ids = verification_ids(bundle.tokenizer, bundle.config.vocab_size)
    for name in ("fp32", "int4"):
        genai = RUNTIMES["onnxruntime_genai"].load(folders / name, threads=2).logits(ids)
        plain = RUNTIMES["onnxruntime"].load(folders / name, threads=2).logits(ids)
        assert genai.shape == plain.shape == (len(ids), bundle.config.vocab_size)
        # the same graph in the same ONNX Runtime: equal up to kernel order (relative to the largest logit)
        assert np.abs(genai - plain).max() <= 1e-4 * np.abs(plain).max(), name
    import torch

    with torch.no_grad():
        ref = build_model(bundle)(torch.tensor([ids]))[0].numpy()
    fp32 = RUNTIMES["onnxruntime_genai"].load(folders / "fp32", threads=2).logits(ids)
    judge(ref, fp32, "onnx:fp32", "onnxruntime-genai's logits")  # raises when the figures miss the bar


def test_genai_tokenizer_agrees_with_tokenizer_json(trained_model, folders):
    rt = RUNTIMES["onnxruntime_genai"].load(folders / "fp32")
    want = load_checkpoint(trained_model).tokenizer.encode(VERIFY_TEXT, add_bos=False)
    assert rt.genai_ids(VERIFY_TEXT) == want


def test_genai_generates_what_onnxruntime_generates(folders):
    genai = RUNTIMES["onnxruntime_genai"].load(folders / "fp32")
    plain = RUNTIMES["onnxruntime"].load(folders / "fp32")
    prompt = genai.prompt_ids("def main():\n    return")
    a = genai.generate(prompt, 24, make_sampler(0.0, 0, 1.0, None))
    b = plain.generate(prompt, 24, make_sampler(0.0, 0, 1.0, None))
    assert a.ids == b.ids and len(a.ids) == 24 and a.prompt_tokens == len(prompt)
    # genai decodes into one shared past/present buffer, as GroupQueryAttention allows (and the builder writes)
    config = json.loads((folders / "fp32" / "genai_config.json").read_text())
    assert config["search"]["past_present_share_buffer"] is True


def test_generate_through_genai_from_the_cli(folders, tmp_path):
    proc = run_cli("generate", folders / "int4", "-p", "Return the", "-n", "8", "--runtime", "onnxruntime_genai")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Return the") and "onnxruntime-genai" in proc.stderr
    portable = tmp_path / "portable"
    portable.mkdir()
    (portable / "model.onnx").write_bytes(b"")
    assert "cannot open" in assert_usage_error(run_cli("generate", portable, "-p", "x", "--runtime",
                                                       "onnxruntime_genai"))


# --- folders from onnxruntime-genai's own model builder (the #22 case: symbolic cache dims) ---------------------
@pytest.fixture(scope="module")
def builder_folders(trained_model, tmp_path_factory):
    """`python -m onnxruntime_genai.models.builder` on the trained checkpoint, at fp32 and int4."""
    import os
    import subprocess
    import sys

    base = tmp_path_factory.mktemp("builder")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    for precision in ("fp32", "int4"):
        proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(trained_model),
                               "-o", str(base / precision), "-p", precision, "-e", "cpu", "-c", str(base / "cache")],
                              capture_output=True, text=True, env=env, timeout=600)
        if proc.returncode != 0:
            pytest.skip(f"onnxruntime-genai's builder failed here: {proc.stderr[-500:]}")
    return base


def test_builder_folders_run_in_both_runtimes(trained_model, builder_folders):
    import runtimes

    bundle = load_checkpoint(trained_model)
    ids = verification_ids(bundle.tokenizer, bundle.config.vocab_size)
    import torch

    with torch.no_grad():
        ref = build_model(bundle)(torch.tensor([ids]))[0].numpy()
    for precision in ("fp32", "int4"):
        folder = builder_folders / precision
        assert runtimes.handling(folder) == "onnxruntime"  # no manifest: by format
        plain = runtimes.open(folder, threads=2).logits(ids)  # symbolic dims read from genai_config.json
        genai = RUNTIMES["onnxruntime_genai"].load(folder, threads=2).logits(ids)
        assert np.abs(genai - plain).max() <= 1e-4 * np.abs(plain).max(), precision
        if precision == "fp32":
            judge(ref, plain, "onnx:fp32", "the builder's fp32 graph")
        else:
            judge(ref, plain, "onnx:int4", "the builder's int4 graph")
    proc = run_cli("generate", builder_folders / "int4", "-p", "Return the", "-n", "6")
    assert proc.returncode == 0 and proc.stdout.startswith("Return the"), proc.stderr[-2000:]


def test_eval_parity_scores_genai_beside_onnxruntime_and_flags_a_foreign_tokenizer(trained_model, folders, tmp_path):
    """Each genai_config.json folder is a row in ONNX Runtime and one in onnxruntime-genai; a copy whose
    tokenizer.json maps two tokens the other way round is scored on the checkpoint's ids but marked, naming the first
    differing token, and the command exits 1."""
    import json
    import shutil

    swapped = tmp_path / "swapped"
    shutil.copytree(folders / "fp32", swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    text = (trained_model / "heldout.txt").read_text()[:6000]
    (tmp_path / "t.txt").write_text(text)
    ours = load_checkpoint(trained_model).tokenizer.encode(text, add_bos=False)
    a, b = ours[0], next(t for t in ours if t != ours[0])
    vocab = tok["model"]["vocab"]
    name_a, name_b = (next(k for k, v in vocab.items() if v == t) for t in (a, b))
    vocab[name_a], vocab[name_b] = b, a
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "report"
    proc = run_cli("eval-parity", trained_model, folders / "fp32", swapped, "-o", out, "--text", tmp_path / "t.txt",
                   "--ctx", "64", "--repeats", "1", "--device", "cpu",
                   env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "parity.json").read_text())["rows"]}
    assert set(rows) == {"fp32", "fp32 (onnxruntime_genai)", "swapped", "swapped (onnxruntime_genai)"}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["fp32"]["tokenizer"]["same"] and rows["fp32 (onnxruntime_genai)"]["tokenizer"]["same"]
    assert rows["fp32 (onnxruntime_genai)"]["format"].startswith("onnx-genai")
    # the same graph in two engines: the same figures up to kernel order
    assert abs(rows["fp32 (onnxruntime_genai)"]["kld_mean"] - rows["fp32"]["kld_mean"]) < 1e-6
    bad = rows["swapped"]["tokenizer"]
    assert not bad["same"] and bad["index"] == 0 and (bad["ours"], bad["theirs"]) == (a, b)
    assert "tokenizer differs from the checkpoint's at token 0" in proc.stderr
    assert "tokenizer differs" in (out / "parity.md").read_text()

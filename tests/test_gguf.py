"""GGUF export checked by llama.cpp itself (llama-cpp-python, F32 KV cache, 1 thread): logits against the reference
model, and llama.cpp's tokenizer against Hugging Face's on real text."""
from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from exporters.gguf.exporter import export
from exporters.gguf.readback import tensor_types
from runtimes.llama_cpp import LlamaCppRuntime
from tests.conftest import assert_usage_error, run_cli
from tests.helpers import random_bundle
from toolkit.checkpoints import load_checkpoint
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError, VerificationError
from toolkit.core.manifest import source_sha256
from toolkit.core.model import build_model
from toolkit.core.tokenizer import Tokenizer

N_TOKENS = 72


def _ids(bundle, n=N_TOKENS, seed=0):
    return torch.randint(3, bundle.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _max_diff(bundle, path, ids):
    rt = LlamaCppRuntime(path, threads=1, ctx=128)
    with torch.no_grad():
        ref = build_model(bundle)(torch.tensor([ids]))[0].numpy()
    got = rt.logits(ids)
    return float(np.abs(got - ref).max()), float((got.argmax(-1) == ref.argmax(-1)).mean()), float(np.abs(ref).max())


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "minimind2_moe"])
def test_f32_and_f16_match_reference(family, tmp_path):
    extra = {"norm_topk_prob": False} if family == "qwen2_moe" else {}  # Qwen1.5-MoE's routing, llama.cpp's too
    # std 0.1: logits up to ~4 (a trained model's range), large enough for layout mistakes to show
    bundle = random_bundle(family, seed=4, std=0.1, tie_word_embeddings=family != "qwen2",
                           max_position_embeddings=2048, **extra)
    ids = _ids(bundle)
    export(bundle, tmp_path / "m-f32.gguf", "f32", verify_file=False)
    diff, agree, scale = _max_diff(bundle, tmp_path / "m-f32.gguf", ids)
    assert scale > 1.0 and diff <= 1e-4 and agree == 1.0, diff
    export(bundle, tmp_path / "m-f16.gguf", "f16", verify_file=False)
    # against the reference on the file's own f16 weights (llama.cpp also rounds activations to f16 in its
    # matmuls: measured 1.6e-3 to 2.7e-3 over the six families); against the fp32 weights on the trained model in
    # test_q8_0_and_f16_on_trained_model
    # (the file read back by the GGUF loader: its own f16 weights)
    diff16, agree16, scale16 = _max_diff(load_checkpoint(tmp_path / "m-f16.gguf"), tmp_path / "m-f16.gguf", ids)
    assert scale16 > 2.0 and diff16 <= 5e-3 and agree16 >= 0.97, (diff16, scale16)
    reader = gguf.GGUFReader(tmp_path / "m-f32.gguf")
    names = {t.name for t in reader.tensors}
    tied_fallback = bundle.config.fam.gguf_arch != "qwen2moe"  # qwen2moe needs output.weight even when tied
    assert ("output.weight" in names) == (not bundle.config.tie_word_embeddings or not tied_fallback)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    assert arch == bundle.config.fam.gguf_arch
    assert float(reader.fields[f"{arch}.rope.freq_base"].parts[-1][0]) == bundle.config.rope_theta
    assert int(reader.fields[f"{arch}.attention.head_count_kv"].parts[-1][0]) == bundle.config.num_kv_heads


def test_llama_without_permutation_would_be_caught(tmp_path, monkeypatch):
    """The q/k permutation matters: without it llama.cpp's pair-wise RoPE computes something else."""
    from toolkit.core.arch import FAMILIES, Family

    bundle = random_bundle("llama", seed=6, max_position_embeddings=2048)
    broken = Family(**{**FAMILIES["llama"].__dict__, "gguf_permute_qk": False})
    monkeypatch.setitem(FAMILIES, "llama", broken)
    export(bundle, tmp_path / "bad.gguf", "f32", verify_file=False)
    monkeypatch.undo()
    assert _max_diff(bundle, tmp_path / "bad.gguf", _ids(bundle))[0] > 1e-2


def test_moe_q8_0_verification_follows_llama_cpp_on_near_tied_routes(tmp_path, monkeypatch):
    """Random qwen3moe models whose q8_0 files llama.cpp routes differently at near-ties (seeds 0, 1, 5: two router
    logits within 0.0015-0.02) pass, the reference following llama.cpp there only; with the reference's own routes
    the flipped tokens show as a max |dlogit| above 0.5 — which the distribution bar of a rounded type tolerates
    (one token of 128), while the float types' relative bar would not."""
    from exporters.gguf.exporter import verify

    followed, diffs = 0, []
    for seed in (0, 1, 5):
        bundle = random_bundle("qwen3_moe", seed=seed, std=0.1)
        report = export(bundle, tmp_path / f"moe{seed}.gguf", "q8_0")
        v = report.verification
        assert v["passed"] and v["judged_as"] == "gguf:q8_0"
        followed += v["near_tie_routes_followed"]
        diffs.append(v["max_abs_diff"])
    assert followed >= 3
    import exporters.gguf.exporter as gguf_exporter

    monkeypatch.setitem(gguf_exporter.ROUTER_GAP, "q8_0", 0.0)  # the reference's own routes everywhere
    own = verify(random_bundle("qwen3_moe", seed=5, std=0.1), tmp_path / "moe5.gguf", "q8_0")
    assert own["near_tie_routes_followed"] == 0 and own["max_abs_diff"] > max(0.5, 2 * diffs[2]), (own, diffs)


def test_moe_that_llama_cpp_computes_differently_is_still_refused(tmp_path, monkeypatch):
    """Following near-tied routes does not hide a real difference: qwen3moe without top-k renormalisation is
    refused up front (llama.cpp's qwen3moe always renormalises); forced past that check, the q8_0 file fails
    verification."""
    from exporters.gguf import tensors

    bundle = random_bundle("qwen3_moe", seed=3, std=0.1, norm_topk_prob=False)
    with pytest.raises(ToolkitError, match="renormalises"):
        export(bundle, tmp_path / "m.gguf", "q8_0")
    monkeypatch.setitem(tensors.RENORMALISES, "qwen3moe", False)
    with pytest.raises(VerificationError, match="differs from the reference model"):
        export(bundle, tmp_path / "m.gguf", "q8_0")
    assert not (tmp_path / "m.gguf").exists()


def test_q8_0_and_f16_on_trained_model(trained_model, tmp_path):
    bundle = load_checkpoint(trained_model)
    export(bundle, tmp_path / "t-f16.gguf", "f16", verify_file=False)
    ids = bundle.tokenizer.encode((trained_model / "heldout.txt").read_text())[:96]
    assert _max_diff(bundle, tmp_path / "t-f16.gguf", ids)[0] <= 5e-3  # against fp32 weights
    report = export(bundle, tmp_path / "t-q8_0.gguf", "q8_0")  # verified against the fp32 weights: KLD bar
    assert report.verification["passed"] and report.verification["kld_mean"] <= 0.02
    held = bundle.tokenizer.encode((trained_model / "heldout.txt").read_text())[:128]
    export(bundle, tmp_path / "t-f32.gguf", "f32")
    fp32 = LlamaCppRuntime(tmp_path / "t-f32.gguf").logits(held)
    q8 = LlamaCppRuntime(tmp_path / "t-q8_0.gguf").logits(held)
    assert (fp32.argmax(-1) == q8.argmax(-1)).mean() >= 0.97
    manifest = json.loads((tmp_path / "t-q8_0.manifest.json").read_text())
    assert manifest["schema"] == "edge-toolkit/artifact-1" and manifest["runtime"] == "llama_cpp"
    assert manifest["dtype"] == "q8_0" and manifest["verification"]["tokenizer_match"]
    assert manifest["quantization"]["type"] == "q8_0" and manifest["source"]["sha256"] == source_sha256(trained_model)
    assert 8.0 < report.bits_per_weight < 9.5


def test_k_quants_on_trained_model(trained_model, tmp_path):
    bundle = load_checkpoint(trained_model)  # widths 256 and 768: every matrix takes K-quants
    report = export(bundle, tmp_path / "t-q4_k_m.gguf", "q4_k_m")  # verified against the file's own weights
    assert report.tensor_types.get("Q4_K", 0) >= 20 and not report.fallbacks
    assert set(tensor_types(tmp_path / "t-q4_k_m.gguf").values()) <= {"F32", "Q4_K", "Q6_K"}
    assert 4.5 < report.bits_per_weight < 6.5
    held = bundle.tokenizer.encode((trained_model / "heldout.txt").read_text())[:128]
    export(bundle, tmp_path / "t-f32.gguf", "f32", verify_file=False)
    fp32 = LlamaCppRuntime(tmp_path / "t-f32.gguf").logits(held)
    q4 = LlamaCppRuntime(tmp_path / "t-q4_k_m.gguf").logits(held)
    assert (fp32.argmax(-1) == q4.argmax(-1)).mean() >= 0.85


def test_k_quant_fallback_is_reported_for_width_2432(tmp_path):
    bundle = random_bundle("llama", seed=8, hidden_size=256, num_heads=4, head_dim=64, intermediate_size=2432,
                           num_layers=1, max_position_embeddings=2048)
    report = export(bundle, tmp_path / "w-q4_k_m.gguf", "q4_k_m", verify_file=False)
    assert report.fallbacks and any("2432" in line for line in report.fallbacks), report.fallbacks
    manifest = json.loads((tmp_path / "w-q4_k_m.manifest.json").read_text())
    assert manifest["details"]["fallbacks"] == report.fallbacks and manifest["verification"] is None


@pytest.mark.parametrize("era", ["minimind2-tokenizer", "minimind3-tokenizer"])
def test_llama_cpp_tokenizes_like_hugging_face(era, shared_data, tmp_path):
    tok = Tokenizer.from_dir(shared_data / era)
    from tests.helpers import random_weights, tiny_config

    cfg = tiny_config("llama", vocab_size=6400, max_position_embeddings=2048)
    bundle = ModelBundle.from_tensors(cfg, random_weights(cfg, 1), tok).check()
    export(bundle, tmp_path / "tok.gguf", "f16")
    rt = LlamaCppRuntime(tmp_path / "tok.gguf", ctx=64)
    wiki = (shared_data / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")
    assert rt.tokenize(wiki) == tok.encode(wiki)
    for text in ["你好，世界！今天是2024年3月15日，气温23.5度。", "emoji 🙂🚀👍🏽 and ZWJ 👨‍👩‍👧", "Ünïcödé ✓ ½ ∑"]:
        assert rt.tokenize(text) == tok.encode(text), text
    reader = gguf.GGUFReader(tmp_path / "tok.gguf")
    assert bytes(reader.fields["tokenizer.ggml.pre"].parts[-1]).decode() == "gpt-2"


def test_export_cli_and_bad_inputs(tmp_path):
    from toolkit.checkpoints.hf_writer import save_hf

    save_hf(random_bundle("qwen3", seed=2, max_position_embeddings=2048), tmp_path / "m")
    proc = run_cli("export", "gguf", tmp_path / "m", "-o", tmp_path / "m-f32.gguf", "--outtype", "f32")
    assert proc.returncode == 0, proc.stderr
    assert "verified in llama.cpp" in proc.stderr
    from_torch = run_cli("generate", tmp_path / "m", "-p", "The quick brown", "-n", "16")
    from_gguf = run_cli("generate", tmp_path / "m-f32.gguf", "-p", "The quick brown", "-n", "16")
    assert from_gguf.returncode == 0, from_gguf.stderr
    assert from_gguf.stdout == from_torch.stdout and "llama.cpp" in from_gguf.stderr
    dest = tmp_path / "x.gguf"
    assert "unknown GGUF type" in assert_usage_error(run_cli("export", "gguf", tmp_path / "m", "-o", dest,
                                                             "--outtype", "q3_x"), dest)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert_usage_error(run_cli("export", "gguf", tmp_path / "m", "-o", blocker / "m.gguf"))
    save_hf(random_bundle("qwen2_moe", seed=2, norm_topk_prob=True), tmp_path / "moe")
    dest = tmp_path / "moe.gguf"
    assert "renormalises" in assert_usage_error(run_cli("export", "gguf", tmp_path / "moe", "-o", dest), dest)
    save_hf(random_bundle("minimind2_moe", seed=2), tmp_path / "mm2")
    dest = tmp_path / "mm2.gguf"  # read back as the Qwen2-MoE it is saved as: renormalised top-k, refused
    assert "renormalises" in assert_usage_error(run_cli("export", "gguf", tmp_path / "mm2", "-o", dest), dest)


def test_non_finite_weights_are_refused(tmp_path, monkeypatch):
    bundle = random_bundle("llama", seed=3)
    w = bundle.load("model.layers.0.mlp.up_proj.weight").clone()
    clean = w.clone()
    w[0, 0] = float("nan")
    from toolkit.core.bundle import TensorRef

    bundle.tensors["model.layers.0.mlp.up_proj.weight"] = TensorRef("x", tuple(w.shape), w.dtype, lambda: w)
    from toolkit.core.errors import ToolkitError

    for outtype in ("f16", "f32", "q8_0"):
        with pytest.raises(ToolkitError, match="NaN"):
            export(bundle, tmp_path / "nan.gguf", outtype)
        assert not (tmp_path / "nan.gguf").exists() and not list(tmp_path.glob("nan.gguf.partial-*"))
    # a finite value float16 cannot hold: refused for f16 with the way out, written as f32
    w[0, 0] = 1e5
    with pytest.raises(ToolkitError, match="beyond float16's range"):
        export(bundle, tmp_path / "big.gguf", "f16", verify_file=False)
    assert not (tmp_path / "big.gguf").exists()
    export(bundle, tmp_path / "big.gguf", "f32", verify_file=False)
    assert (tmp_path / "big.gguf").is_file()
    # converted in small steps: a NaN in the first or the last step of a tensor is found
    from exporters.gguf import writer

    monkeypatch.setattr(writer, "CONVERT_STEP", 8)
    for index in ((0, 0), (-1, -1)):
        w.copy_(clean)
        w[index] = float("nan")
        with pytest.raises(ToolkitError, match="NaN"):
            export(bundle, tmp_path / "nan.gguf", "f16", verify_file=False)
        assert not (tmp_path / "nan.gguf").exists()


def test_sigkill_mid_export_leaves_nothing_at_destination(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT
    from toolkit.checkpoints.hf_writer import save_hf

    # big enough (25M parameters, numpy q8_0) that the write takes a while
    save_hf(random_bundle("llama", seed=1, hidden_size=512, num_heads=8, head_dim=64, num_layers=8,
                          intermediate_size=1408, max_position_embeddings=2048), tmp_path / "m")
    dest = tmp_path / "m-q8_0.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "export", "gguf", str(tmp_path / "m"), "-o", str(dest),
                             "--outtype", "q8_0"], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        partial = list(tmp_path.glob("m-q8_0.gguf.partial-*"))
        if partial and partial[0].stat().st_size > 1_000_000:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "export finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not dest.exists() and not (tmp_path / "m-q8_0.manifest.json").exists()
    assert not (tmp_path / "m-q8_0.Modelfile").exists()


def test_tokenizer_without_merges_is_refused(tmp_path):
    from toolkit.checkpoints.hf_writer import save_hf

    save_hf(random_bundle("llama", seed=2, max_position_embeddings=2048), tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "tokenizer.json").read_text())
    spec["model"]["merges"] = []
    (tmp_path / "m" / "tokenizer.json").write_text(json.dumps(spec))
    dest = tmp_path / "m.gguf"
    assert "merges" in assert_usage_error(run_cli("export", "gguf", tmp_path / "m", "-o", dest), dest)
    assert not (tmp_path / "m.manifest.json").exists() and not (tmp_path / "m.Modelfile").exists()

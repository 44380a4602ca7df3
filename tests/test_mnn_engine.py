"""MNN's LLM-engine folders (`toolkit export mnn`, the default layout): written by MNN's own exporter (llmexport) in an
audited child process, run by MNN.llm -- the engine of llm_demo and the MNN Chat app -- with its own KV cache.
Oracles nobody here wrote: the `tokenizers` library, transformers' apply_chat_template, and the reference model
(held to transformers in test_reference_model.py)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("MNN")
if importlib.util.find_spec("llmexport") is None:  # its package cannot be imported outside its child process
    pytest.skip("llmexport (MNN's exporter) is not installed", allow_module_level=True)

from exporters.mnn import engine  # noqa: E402
from tests.conftest import assert_usage_error, run_cli  # noqa: E402
from tests.helpers import random_bundle, random_weights, tiny_config  # noqa: E402
from toolkit.core.bundle import ModelBundle  # noqa: E402
from toolkit.core.errors import ToolkitError, VerificationError  # noqa: E402
from toolkit.core.tokenizer import Tokenizer  # noqa: E402
from toolkit.core.verify import figures  # noqa: E402

TEXT = ("The engine keeps its own cache; each step appends one token. Numbers 12345, symbols {}[]<>, and "
        "accents: café, naïve, Zürich. ") * 3
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
            {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And three?"}]
# KLD of MNN.llm's logits over a prefill of the text against the reference (trained test model), per bit width:
# measured 16: ~1e-6, 8 (memory low, int8 activations): ~1e-3, 4: ~3e-2; the bounds leave room, and a wrong file
# (see the mutations below and in test_real_models.py) is far above them
KLD_BOUND = {16: 1e-4, 8: 0.02, 4: 0.3}


def _reference_logits(bundle, ids):
    from exporters.onnx.exporter import TorchReference

    return TorchReference(bundle, len(ids)).forward(np.array([ids]), np.ones((1, len(ids)), np.int64))[0][0]


@pytest.fixture(scope="module")
def engine_folders(trained_model, tmp_path_factory):
    work = tmp_path_factory.mktemp("engine")
    out = {}
    for bits in (16, 8, 4):
        out[bits] = work / f"mnn{bits}"
        proc = run_cli("export", "mnn", trained_model, "-o", out[bits], "--bits", bits)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "engine layout" in proc.stderr and "verified through MNN.llm" in proc.stderr, proc.stderr[-800:]
    return out


def test_engine_folders_of_the_trained_model(trained_model, engine_folders):
    """MNN's own folder layout, verified, and MNN.llm's logits (prefill, then cached steps) near the reference."""
    from runtimes import EngineText, Stepping
    from runtimes import open as open_runtime
    from runtimes.mnn_llm import MnnLlmRuntime
    from toolkit.checkpoints import load_checkpoint

    bundle = load_checkpoint(trained_model)
    ids = bundle.tokenizer.encode(TEXT, add_bos=False)[:80]
    ref = _reference_logits(bundle, ids)
    for bits, folder in engine_folders.items():
        for name in engine.ENGINE_FILES + ("tokenizer.json", "manifest.json"):
            assert (folder / name).is_file(), (bits, name)
        assert not (folder / ".export.log").exists() and not (folder / "onnx").exists()
        meta = json.loads((folder / "manifest.json").read_text())
        v = meta["verification"]
        assert v["passed"] and v["judged_as"] == f"mnn:{bits}" and v["engine"] == "MNN.llm" and v["tokenizer_match"]
        assert meta["details"]["layout"] == "engine" and json.loads((folder / "config.json").read_text())[
            "memory"] == "low"
        runtime = open_runtime(folder, threads=1)
        assert isinstance(runtime, MnnLlmRuntime) and isinstance(runtime, Stepping) and isinstance(runtime,
                                                                                                    EngineText)
        runtime.reset()
        got = np.concatenate([runtime.step(ids[:64])] + [runtime.step([t]) for t in ids[64:]])
        fig = figures(ref, got)
        assert fig["kld_mean"] < KLD_BOUND[bits], (bits, fig)
        if bits == 16:
            assert fig["rel_err"] < 1e-2 and fig["top1"] == 1.0, fig
    sizes = {bits: sum(p.stat().st_size for p in f.glob("llm.mnn*")) for bits, f in engine_folders.items()}
    assert sizes[4] < 0.65 * sizes[8] < 0.65 * sizes[16], sizes


def test_engine_tokenizer_and_template_equal_hugging_face(trained_model, engine_folders):
    """tokenizer.mtok (MNN's) encodes as `tokenizers` does, and MNN's minja renders the chat template as
    transformers does."""
    import tokenizers
    import transformers

    from runtimes.mnn_llm import MnnLlmRuntime

    runtime = MnnLlmRuntime(engine_folders[4])
    want = tokenizers.Tokenizer.from_file(str(trained_model / "tokenizer.json")).encode(TEXT).ids
    assert runtime.engine_ids(TEXT) == want
    hf = transformers.AutoTokenizer.from_pretrained(str(trained_model))
    rendered = hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert runtime.engine_chat(MESSAGES) == rendered


def test_generate_and_eval_parity_use_the_engine(trained_model, engine_folders, tmp_path):
    # greedy tokens of the 16-bit engine folder equal the reference model's on the same prompt
    prompt = "def add(a, b):"
    got = run_cli("generate", engine_folders[16], "--prompt", prompt, "-n", 12)
    want = run_cli("generate", trained_model, "--prompt", prompt, "-n", 12)
    assert got.returncode == 0 and want.returncode == 0, (got.stderr[-1500:], want.stderr[-1500:])
    assert got.stdout == want.stdout and got.stdout.strip(), (got.stdout, want.stdout)
    assert "MNN.llm" in got.stderr, got.stderr[-500:]
    out = tmp_path / "report"
    proc = run_cli("eval-parity", trained_model, engine_folders[8], engine_folders[4], "-o", out, "--ctx", 128,
                   "--repeats", 1, "--device", "cpu", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["name"]: r for r in json.loads((out / "parity.json").read_text())["rows"]}
    for bits in (8, 4):
        row = rows[f"mnn{bits}"]
        assert row["status"] == "ok" and row["runtime"] == "mnn" and row["format"] == f"mnn {bits}-bit engine", row
        assert 0 < row["kld_mean"] < KLD_BOUND[bits] and row["decode_tps"] > 0 and row["prefill_tps"] > 0
        assert row["size_bytes"] == sum(p.stat().st_size for p in engine_folders[bits].glob("llm.mnn*")
                                        if p.suffix != ".json")
    assert rows["mnn8"]["kld_mean"] < rows["mnn4"]["kld_mean"]


def test_a_folder_as_llmexport_writes_it(trained_model, engine_folders, tmp_path):
    """A folder of MNN's llmexport has no tokenizer.json and no manifest, only MNN's tokenizer.mtok: eval-parity
    scores it, with the engine's own tokenizer checked token for token against the checkpoint's. The same folder
    with another model's tokenizer.mtok: the row names the first token where they part."""
    import shutil

    own = {"tokenizer.json", "tokenizer_config.json", "manifest.json"}  # what the toolkit adds to llmexport's files
    bare, other = tmp_path / "llmexport", tmp_path / "other-tokenizer"
    for folder in (bare, other):
        shutil.copytree(engine_folders[4], folder, ignore=lambda _d, names: [n for n in names if n in own])
    foreign = tmp_path / "foreign"
    engine.export(random_bundle("llama", seed=1), foreign, bits=16)  # the tests' tiny tokenizer, 320 tokens
    shutil.copy(foreign / "tokenizer.mtok", other / "tokenizer.mtok")
    out = tmp_path / "report"
    proc = run_cli("eval-parity", trained_model, bare, other, "-o", out, "--ctx", 128, "--repeats", 1, "--device",
                   "cpu", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    # a row on another tokenizer fails the run (exit 1), the report is written all the same
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "other-tokenizer: its tokenizer differs from the checkpoint's at token" in last, last
    rows = {r["name"]: r for r in json.loads((out / "parity.json").read_text())["rows"]}
    row = rows["llmexport"]
    assert row["status"] == "ok" and row["format"] == "mnn 4-bit engine" and row["tokenizer"]["same"], row
    assert 0 < row["kld_mean"] < KLD_BOUND[4]
    check = rows["other-tokenizer"]["tokenizer"]
    assert not check["same"] and check["theirs"] is not None, check
    assert f"differs from the checkpoint's at token {check['index']}" in (out / "parity.md").read_text()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe"])
def test_families_the_engine_computes(family, tmp_path):
    """Every family of the architecture table that MNN's engine computes exports at 16 bits and verifies."""
    bundle = random_bundle(family, seed=3, tie_word_embeddings=family != "qwen2")
    report = engine.export(bundle, tmp_path / "out", bits=16, group_size=32)
    v = report.verification
    assert v["passed"] and v["rel_err"] < 1e-2 and v["top1"] >= 0.95, v


@pytest.mark.parametrize("family", ["nanochat", "qwen2_moe", "minimind2_moe"])
def test_families_the_engine_cannot_compute_are_refused(family, tmp_path):
    with pytest.raises(ToolkitError) as e:
        engine.export(random_bundle(family, seed=1), tmp_path / "out", bits=16)
    assert "MNN's LLM engine cannot compute" in e.value.message and "--layout module" in e.value.hint
    assert not list(tmp_path.iterdir())


def test_llama3_rope_scaling_is_set_in_the_graph(tmp_path):
    """llmexport 0.0.5 ignores llama3 scaling; the child sets the model's own frequencies. Without them (the
    mutation) the same folder is refused by the verification, positions past the original context included."""
    from tests.test_rope_scaling import _bundle

    bundle = _bundle("llama", "llama3", tie_word_embeddings=True)
    report = engine.export(bundle, tmp_path / "ok", bits=16, group_size=32)
    assert report.verification["passed"] and report.verification["rel_err"] < 1e-2
    plain = tmp_path / "plain"
    plain.mkdir()
    hf = tmp_path / "hf"
    from toolkit.checkpoints.hf_writer import save_hf

    save_hf(bundle, hf)
    engine.run_child(hf, plain, engine.llmexport_args(16, 32, False), {})
    bundle.tokenizer.save(plain)
    with pytest.raises(VerificationError, match="differ"):
        engine.verify(bundle, plain, 16)


@pytest.mark.parametrize("name, family, rows", [("qwen3", "qwen3", 151_936), ("llama3-instruct", "llama", 128_256)])
def test_real_tokenizers_in_the_engine(name, family, rows, shared_data, tmp_path):
    """Qwen3's and Llama-3-Instruct's tokenizers as the models ship them, on random-weight models of their
    vocabulary: MNN's tokenizer.mtok encodes as `tokenizers` does and MNN renders their chat templates as
    transformers does (the export checks both itself; here the oracles are the libraries)."""
    import tokenizers
    import transformers

    from runtimes.mnn_llm import MnnLlmRuntime

    folder = shared_data / "real-tokenizers" / name
    tok = Tokenizer.from_dir(folder)
    cfg = tiny_config(family, vocab_size=rows, max_position_embeddings=2048, tie_word_embeddings=True)
    bundle = ModelBundle.from_tensors(cfg, random_weights(cfg, 1), tok).check()
    engine.export(bundle, tmp_path / "out", bits=16, group_size=32)
    runtime = MnnLlmRuntime(tmp_path / "out")
    text = TEXT + " 日本語のテキスト, Ελληνικά, emoji 🙂  two  spaces\n\ttab"
    want = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text).ids  # Llama-3: BOS first
    assert runtime.engine_ids(text) == want
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert runtime.engine_chat(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False,
                                                                   add_generation_prompt=True)


def test_bad_inputs_exit_2(trained_model, tmp_path):
    dest = tmp_path / "out"
    last = assert_usage_error(run_cli("export", "mnn", trained_model, "-o", dest, "--layout", "phone"), dest)
    assert "--layout phone" in last
    last = assert_usage_error(run_cli("export", "mnn", trained_model, "-o", dest, "--memory", "high"), dest)
    assert "--memory high" in last
    nanochat = tmp_path / "nanochat"
    from toolkit.checkpoints.hf_writer import save_hf

    save_hf(random_bundle("nanochat", seed=2), nanochat)
    last = assert_usage_error(run_cli("export", "mnn", nanochat, "-o", dest, "--bits", "16"), dest)
    assert "cannot compute a nanochat model" in last and "--layout module" in last


def test_gptq_codes_are_carried_into_the_engine_folder(trained_model, tmp_path):
    """`quantize int4` (GPTQ, group 64) exported at --bits 4 --group-size 64 keeps GPTQ's codes: with float
    activations MNN's engine computes the GPTQ checkpoint's own logits as closely as its 16-bit folders compute the
    source's (measured rel err 2e-6 on mm26, 1.7e-4 on the test model), where MNN re-quantizing the same weights
    (another group size: the mutation) is far off, and says that it re-quantized."""
    gptq = tmp_path / "gptq"
    proc = run_cli("quantize", "int4", trained_model, "-o", gptq, "--group-size", 64, "--nsamples", 8,
                   "--seqlen", 128)
    assert proc.returncode == 0, proc.stderr[-2000:]
    carried, requantized = tmp_path / "carried", tmp_path / "requantized"
    proc = run_cli("export", "mnn", gptq, "-o", carried, "--bits", 4, "--group-size", 64, "--memory", "normal")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "GPTQ's codes in" in proc.stderr and "re-quantized" not in proc.stderr, proc.stderr[-1500:]
    meta = json.loads((carried / "manifest.json").read_text())
    assert meta["quantization"]["method"].startswith("GPTQ codes carried"), meta["quantization"]
    exact = meta["verification"]
    assert exact["passed"] and exact["rel_err"] < 1e-3 and exact["kld_mean"] < 1e-5 and exact["top1"] == 1.0, exact
    proc = run_cli("export", "mnn", gptq, "-o", requantized, "--bits", 4, "--group-size", 32, "--memory", "normal")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "were re-quantized" in proc.stderr and "--group-size 64" in proc.stderr, proc.stderr[-1500:]
    other = json.loads((requantized / "manifest.json").read_text())["verification"]
    assert other["rel_err"] > 10 * exact["rel_err"] and other["kld_mean"] > 30 * exact["kld_mean"], (other, exact)


FULL_DISK = """
import errno, safetensors.torch
def _full(tensors, filename, metadata=None):
    raise OSError(errno.ENOSPC, "No space left on device", str(filename))
safetensors.torch.save_file = _full
"""


def test_a_full_disk_is_said_plainly(trained_model, tmp_path):
    """The disk fills while the export writes (here: the first weights file): exit 2, the reason in one line,
    nothing at the destination."""
    import os

    from tests.conftest import ROOT

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(FULL_DISK)
    dest = tmp_path / "out"
    proc = run_cli("export", "mnn", trained_model, "-o", dest, "--bits", 16,
                   env={"PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)])})
    last = assert_usage_error(proc, dest)
    assert "no space left on the device" in last, last
    assert [p.name for p in tmp_path.iterdir()] == ["hooks"], list(tmp_path.iterdir())


def test_a_relative_destination(trained_model, tmp_path):
    """`-o` relative to the working directory (as `make demo` passes it): MNN's exporter runs in the folder it
    writes, so every path it is handed must be absolute."""
    proc = run_cli("export", "mnn", trained_model, "-o", "rel/out", "--bits", 16, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "rel" / "out" / "llm.mnn").is_file()
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["out"]  # no request file or partial folder left

"""MNN export, `--layout module` (the toolkit's own graph; the engine layout is in test_mnn_engine.py), checked in MNN
(the wheel's engine) against the reference model (itself held to transformers in
test_reference_model.py); MNN's own read-back of its weights as the oracle for our model of its grid; the trained
model's 8/4-bit exports; eval-parity rows; no telemetry; bad inputs."""
from __future__ import annotations

import json
import os
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("MNN")

from exporters.mnn import converter, weights  # noqa: E402
from exporters.mnn.exporter import export  # noqa: E402
from exporters.onnx.exporter import TorchReference  # noqa: E402
from runtimes.mnn import MnnRuntime  # noqa: E402
from tests.conftest import ROOT, assert_usage_error, run_cli  # noqa: E402
from tests.helpers import random_bundle  # noqa: E402
from toolkit.core.errors import VerificationError  # noqa: E402
from toolkit.core.tokenizer import Tokenizer  # noqa: E402


def _bundle(family: str, seed: int = 5):
    return random_bundle(family, seed=seed, tie_word_embeddings=True)


def _prefill_and_decode(bundle, runtime, prompt: int = 48, steps: int = 16):
    """Max |dlogit| of prefill and of the cached single-token steps against the reference model on `bundle`."""
    ids = [int(i) for i in np.random.default_rng(0).integers(3, bundle.config.vocab_size, prompt + steps)]
    ref = TorchReference(bundle, prompt + steps)
    want, state = ref.forward(np.array([ids[:prompt]]), np.ones((1, prompt), np.int64))
    runtime.reset()
    prefill = float(np.abs(runtime.step(ids[:prompt]) - want[0]).max())
    decode = 0.0
    for k in range(prompt, prompt + steps):
        want, state = ref.forward(np.array([[ids[k]]]), np.ones((1, k + 1), np.int64), state)
        decode = max(decode, float(np.abs(runtime.step([ids[k]]) - want[0]).max()))
    return prefill, decode


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_16bit_matches_reference(family, tmp_path):
    """Random weights (std 0.15, logits in the tens: layout mistakes show): MNN computes exactly the model on the
    file's fp16 weights, and differs from the fp32 model only by that rounding."""
    bundle = _bundle(family)
    report = export(bundle, tmp_path / "out", bits=16)
    assert report.verification["passed"] and report.verification["finite"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "embeddings.f16.npy", "manifest.json", "model.mnn", "tokenizer.json", "tokenizer_config.json"]
    runtime = MnnRuntime(tmp_path / "out")
    prefill, decode = _prefill_and_decode(weights.file_bundle(bundle, 16, 0), runtime)
    assert prefill <= 1e-4 and decode <= 1e-4, (prefill, decode)
    prefill, decode = _prefill_and_decode(bundle, runtime)
    scale = report.verification["max_abs_logit"]
    assert prefill <= 5e-3 * scale and decode <= 5e-3 * scale, (prefill, decode, scale)
    assert not list(tmp_path.glob("onnx-*")) and not list(tmp_path.glob("*.partial-*"))


@pytest.mark.parametrize("family", ["qwen2", "qwen3_moe", "minimind2_moe", "nanochat"])
def test_other_families_16bit(family, tmp_path):
    """The same graph covers every family of the architecture table (MoE in dense form, NanoChat's relu², weightless
    norms, rotation by -theta and softcap)."""
    bundle = random_bundle(family, seed=4)
    export(bundle, tmp_path / "out", bits=16)
    prefill, decode = _prefill_and_decode(weights.file_bundle(bundle, 16, 0), MnnRuntime(tmp_path / "out"))
    # NanoChat: the converter truncates its softcap's 1/15 to fp16
    bound = 2e-3 if family == "nanochat" else 1e-4
    assert prefill <= bound and decode <= bound, (prefill, decode)


def test_16bit_trained_model_within_1e_2(trained_model, tmp_path):
    """On the trained model, against its fp32 weights: 64 tokens, the last 16 through the cache."""
    from toolkit.checkpoints import load_checkpoint

    bundle = load_checkpoint(trained_model)
    export(bundle, tmp_path / "out", bits=16, verify_model=False)
    prefill, decode = _prefill_and_decode(bundle, MnnRuntime(tmp_path / "out"))
    assert prefill <= 1e-2 and decode <= 1e-2, (prefill, decode)


def test_cache_grows_past_its_first_capacity(tmp_path):
    """A sequence that outgrows its buffers (64-slot steps) gets larger ones with the cache carried over."""
    bundle = _bundle("llama")
    export(bundle, tmp_path / "out", bits=16, verify_model=False)
    runtime = MnnRuntime(tmp_path / "out")
    prefill, decode = _prefill_and_decode(weights.file_bundle(bundle, 16, 0), runtime, prompt=120, steps=20)
    assert runtime.capacity == 192
    assert prefill <= 1e-4 and decode <= 1e-4, (prefill, decode)


@pytest.mark.parametrize("bits,group_size", [(8, 32), (4, 16), (4, 0)])
def test_our_grid_is_the_one_mnn_stores(bits, group_size, tmp_path):
    """The weights MNN itself reads back through its own MatMul equal what the exporter's verification assumes."""
    bundle = _bundle("llama")
    stored = weights.read_back(bundle, converter.converter_flags(bits, group_size, False), tmp_path)
    assert set(stored) == set(weights.matmul_weights(bundle))
    for name, got in stored.items():
        want = weights.mnn_block_grid(bundle.load(name, torch.float32), bits, group_size)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (name, float((got - want).abs().max()))
        assert not torch.allclose(got, bundle.load(name, torch.float32), atol=1e-4)  # it is quantized


@pytest.fixture(scope="module")
def trained_mnn(trained_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("mnn")
    folders = {}
    for bits in (8, 4):
        folders[bits] = root / f"mnn{bits}"
        proc = run_cli("export", "mnn", trained_model, "-o", folders[bits], "--bits", bits, "--layout", "module")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "module layout" in proc.stderr and "verified in MNN" in proc.stderr
    return folders


def test_trained_model_8_and_4_bit_agree_with_fp32(trained_model, trained_mnn):
    from toolkit.checkpoints import load_checkpoint
    from toolkit.core.model import build_model

    tok = Tokenizer.from_dir(trained_model)
    ids = tok.encode((trained_model / "heldout.txt").read_text(encoding="utf-8"), add_bos=False)
    chunks = [ids[i * 128:(i + 1) * 128] for i in range(4)]
    model = build_model(load_checkpoint(trained_model))
    with torch.no_grad():
        ref = np.concatenate([model(torch.tensor([c]))[0].numpy() for c in chunks]).argmax(-1)
    agreement = {}
    for bits, folder in trained_mnn.items():
        rt = MnnRuntime(folder)
        got = np.concatenate([rt.logits(c) for c in chunks])
        assert np.isfinite(got).all()
        agreement[bits] = float((got.argmax(-1) == ref).mean())
        meta = json.loads((folder / "manifest.json").read_text())
        assert meta["quantization"]["bits"] == bits and meta["quantization"]["group_size"] == 64
        assert meta["details"]["memory_mode"] == "low" and meta["runtime"] == "mnn"
    assert agreement[8] >= 0.95 and agreement[4] >= 0.85, agreement
    sizes = {b: (f / "model.mnn").stat().st_size for b, f in trained_mnn.items()}
    assert sizes[4] < 0.6 * sizes[8]


def test_mnn_rows_in_eval_parity(trained_model, trained_mnn, tmp_path):
    out = tmp_path / "report"
    proc = run_cli("eval-parity", trained_model, trained_mnn[8], trained_mnn[4], "-o", out, "--ctx", 128,
                   "--repeats", 1, "--device", "cpu", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "parity.json").read_text())
    rows = {r["name"]: r for r in result["rows"]}
    base = result["baseline"]["ppl"]
    for bits in (8, 4):
        row = rows[f"mnn{bits}"]
        assert row["status"] == "ok" and row["runtime"] == "mnn" and row["format"] == f"mnn {bits}-bit"
        assert abs(row["ppl"] / base - 1) < (0.02 if bits == 8 else 0.06), (row["ppl"], base)
        assert 0 < row["kld_mean"] < 0.1
        assert row["decode_tps"] > 0 and row["prefill_tps"] > 0 and row["size_bytes"] > 0
    assert rows["mnn8"]["kld_mean"] < rows["mnn4"]["kld_mean"]
    assert "| mnn4 | mnn 4-bit |" in (out / "parity.md").read_text()


AUDIT = textwrap.dedent("""
    import atexit, json, os, sys
    _log = open(os.environ["AUDIT_LOG"], "a")
    _watched = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "subprocess.Popen", "os.system",
                "os.exec", "os.posix_spawn", "os.spawn", "urllib.Request")
    def _hook(event, args):
        if event in _watched or (event == "open" and args and "machine-id" in str(args[0])):
            _log.write(json.dumps([event, repr(args)[:500]]) + "\\n"); _log.flush()
    sys.addaudithook(_hook)
    # MNN's modules at exit, with the file each was loaded from (None: a module made in memory, as the llmexport
    # child's stand-in for MNN.tools is)
    atexit.register(lambda: (_log.write(json.dumps(["modules", sorted(
        (m, getattr(sys.modules[m], "__file__", None)) for m in list(sys.modules) if m.startswith("MNN"))]) + "\\n"),
                             _log.flush()))
""")

# the only child processes of an export: the converter extension (module layout), MNN's llmexport (engine layout)
CHILDREN = {"module": "_tools", "engine": "exporters.mnn.llmexport_child"}


@pytest.mark.parametrize("layout", ["engine", "module"])
def test_export_attempts_no_network_and_no_pip(layout, trained_model, tmp_path):
    """Every Python process of an export (the CLI and its child: the converter, or MNN's llmexport) records its
    connection, process and machine-id attempts through an audit hook: none reaches the network or reads a machine
    id, the only child is the converter or the exporter, and MNN's own MNN.tools (whose import runs pip and uploads
    logs) is never loaded from the wheel in any of them."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT)
    log = tmp_path / "audit.log"
    env = {"AUDIT_LOG": str(log), "PYTHONPATH": os.pathsep.join([str(hooks), str(ROOT)])}
    proc = run_cli("export", "mnn", trained_model, "-o", tmp_path / "out", "--bits", "4", "--layout", layout,
                   env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    events = [json.loads(line) for line in log.read_text().splitlines()]
    modules = [e[1] for e in events if e[0] == "modules"]
    assert len(modules) >= 2, events  # the CLI and its child both ran under the hook
    loaded = [(m, f) for mods in modules for m, f in mods if m.startswith("MNN.tools")]
    assert all(f is None for _, f in loaded), loaded
    if layout == "engine":
        assert any(m == "MNN.tools.mnnconvert" for m, _ in loaded), modules  # the stand-in ran the conversion
    network = [e for e in events if e[0].startswith("socket") or e[0] == "urllib.Request"]
    assert not network, network
    assert not [e for e in events if e[0] == "open"], events
    spawned = [e[1] for e in events if e[0] in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                                                 "os.spawn")]
    assert spawned and all(sys.executable in s and CHILDREN[layout] in s for s in spawned), spawned
    assert not any("pip" in s.replace(sys.executable, "") for s in spawned), spawned


def test_converter_failure_is_reported(tmp_path):
    """The converter returns True even when it fails; its own reason must reach the user (exit 1)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("IsNaN", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.BOOL, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(VerificationError, match="IsNaN"):
        converter.convert(tmp_path / "bad.onnx", tmp_path / "bad.mnn", [])


def test_bad_inputs_exit_2(trained_model, tmp_path):
    dest = tmp_path / "out"
    last = assert_usage_error(run_cli("export", "mnn", trained_model, "-o", dest, "--bits", "12"), dest)
    assert "--bits 12" in last
    # the test model's input widths are 256 and 768; 96 does not divide 256
    last = assert_usage_error(run_cli("export", "mnn", trained_model, "-o", dest, "--bits", "4", "--group-size",
                                      "96"), dest)
    assert "does not divide" in last
    last = assert_usage_error(run_cli("export", "mnn", trained_model, "-o", dest, "--bits", "16", "--hqq"), dest)
    assert "--hqq" in last

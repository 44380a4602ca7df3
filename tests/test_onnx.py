"""ONNX export checked in ONNX Runtime against the reference model (itself held to transformers in
test_reference_model.py), the fused graph also through onnxruntime-genai, and ONNX Runtime's INT8/INT4 quantizers on
the session's trained model."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import exporters.onnx.graph as graph_module
from exporters.onnx.exporter import DECODE_STEPS, PAD, TorchReference, compare, export
from runtimes.onnxruntime import OnnxRuntime
from tests.conftest import assert_usage_error, run_cli
from tests.helpers import random_bundle
from toolkit.checkpoints.hf_writer import save_hf
from toolkit.core.errors import VerificationError
from toolkit.core.tokenizer import Tokenizer

FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "minimind2_moe", "nanochat"]


def _bundle(family: str, seed: int = 3):
    return random_bundle(family, seed=seed, tie_word_embeddings=family in ("llama", "qwen3"))


def _check_against_reference(bundle, folder) -> dict:
    result = compare(TorchReference(bundle, 64), OnnxRuntime(folder), bundle.tokenizer, bundle.config.vocab_size)
    assert result["decode_steps"] == DECODE_STEPS == 16 and result["batch"] == 2 and result["left_padding"] == PAD
    assert result["finite"]
    assert result["max_abs_diff"] <= 1e-4, result
    return result


@pytest.mark.parametrize("family", FAMILIES)
def test_portable_fp32_matches_reference(family, tmp_path):
    bundle = _bundle(family)
    report = export(bundle, tmp_path / "out", "portable", 20)
    assert report.verification["max_abs_diff"] <= 1e-4
    _check_against_reference(bundle, tmp_path / "out")
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    onnx.checker.check_model(str(tmp_path / "out" / "model.onnx"))  # by path: it follows the external data
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert f"past_key_values.{bundle.config.num_layers - 1}.value" in names
    kv = next(i for i in model.graph.input if i.name == "past_key_values.0.key").type.tensor_type.shape.dim
    assert kv[1].dim_value == bundle.config.num_kv_heads and kv[2].dim_param == "past_sequence_length"
    # weights in one external file; the head is its own constant even when tied
    assert sorted(p.name for p in (tmp_path / "out").glob("model.onnx*")) == ["model.onnx", "model.onnx.data"]
    head = next(n for n in model.graph.node if n.name == "/lm_head/MatMul")
    assert head.input[1] == "lm_head.weight"


@pytest.mark.parametrize("opset", [17, 23])
def test_other_opsets(opset, tmp_path):
    bundle = _bundle("qwen3")
    export(bundle, tmp_path / "out", "portable", opset)
    _check_against_reference(bundle, tmp_path / "out")
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    assert model.opset_import[0].version == opset
    assert ("RMSNormalization" in {n.op_type for n in model.graph.node}) == (opset >= 23)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "nanochat"])
def test_ort_fused_fp32_matches_reference(family, tmp_path):
    bundle = _bundle(family)
    export(bundle, tmp_path / "out", "ort", 20)
    _check_against_reference(bundle, tmp_path / "out")
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= ops
    qkv = [n for n in model.graph.node if n.name.endswith("qkv_proj/MatMul")]
    assert len(qkv) == bundle.config.num_layers  # packed QKV
    assert json.loads((tmp_path / "out" / "genai_config.json").read_text())["model"]["decoder"]["num_key_value_heads"] \
        == bundle.config.num_kv_heads


def test_verification_catches_a_wrong_graph(tmp_path, monkeypatch):
    """A RoPE off by 1 % still loads and runs: the export must refuse it and leave nothing behind."""
    bundle = _bundle("llama")
    real = graph_module._rope_inv_freq
    monkeypatch.setattr(graph_module, "_rope_inv_freq", lambda cfg: real(cfg) * 1.01)
    with pytest.raises(VerificationError):
        export(bundle, tmp_path / "out", "portable", 20)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.partial-*"))


@pytest.fixture(scope="module")
def trained_onnx(trained_model, tmp_path_factory):
    """The session's trained model exported (ort variant) and quantized to int8 and int4 through the CLI."""
    root = tmp_path_factory.mktemp("onnx")
    fp32, int8, int4 = root / "fp32", root / "int8", root / "int4"
    for args in (["export", "onnx", trained_model, "-o", fp32, "--variant", "ort"],
                 ["quantize", "int8", fp32, "-o", int8],
                 ["quantize", "int4", trained_model, "-o", int4, "--format", "onnx"]):  # from the checkpoint
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return fp32, int8, int4


def _heldout_logits(folder, model_dir, n_chunks=3, ctx=128):
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode((model_dir / "heldout.txt").read_text(encoding="utf-8"), add_bos=False)
    rows = np.array([ids[i * ctx:(i + 1) * ctx] for i in range(n_chunks)], np.int64)
    return OnnxRuntime(folder).forward(rows, np.ones_like(rows))[0]


def test_quantized_graphs_agree_with_fp32_and_quantize_the_head(trained_model, trained_onnx):
    fp32, int8, int4 = trained_onnx
    ref = _heldout_logits(fp32, trained_model).argmax(-1)
    for folder, head_op in ((int8, "MatMulInteger"), (int4, "MatMulNBits")):
        got = _heldout_logits(folder, trained_model)
        assert np.isfinite(got).all()
        agreement = float((got.argmax(-1) == ref).mean())
        assert agreement >= 0.95, (folder.name, agreement)
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        head = [n for n in model.graph.node if n.name.startswith("/lm_head/MatMul") and n.op_type == head_op]
        assert head, f"{folder.name}: lm_head not quantized"
        assert "MatMul" not in {n.op_type for n in model.graph.node}  # every weight matmul quantized
        if head_op == "MatMulNBits":
            assert {a.name: a.i for a in head[0].attribute}["bits"] == 8
            body = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n is not head[0]]
            assert body and all({a.name: a.i for a in n.attribute}["bits"] == 4 and
                                {a.name: a.i for a in n.attribute}["block_size"] == 32 and
                                {a.name: a.i for a in n.attribute}["accuracy_level"] == 4 for n in body)
        size = sum(p.stat().st_size for p in folder.glob("model.onnx*"))
        assert size < 0.6 * sum(p.stat().st_size for p in fp32.glob("model.onnx*"))


def test_genai_runs_the_fused_graph(trained_model, trained_onnx):
    """onnxruntime-genai (an independent runtime of the same graphs) generates the same greedy tokens as our
    ONNX Runtime loop and as the reference model."""
    og = pytest.importorskip("onnxruntime_genai")
    from runtimes import RUNTIMES

    tok = Tokenizer.from_dir(trained_model)
    prompt = tok.encode("Return the number of", add_bos=False)
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
    torch_ids = RUNTIMES["torch"].load(trained_model).generate(prompt, 24, greedy).ids
    for folder in trained_onnx[:1] + trained_onnx[2:]:
        model = og.Model(str(folder))
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + 24, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(prompt)
        genai_ids = []
        while not gen.is_done():
            gen.generate_next_token()
            genai_ids.append(int(gen.get_next_tokens()[0]))
        ours = OnnxRuntime(folder).generate(prompt, 24, greedy).ids
        assert genai_ids == ours
        if folder == trained_onnx[0]:
            assert ours == torch_ids


def test_in_place_cache_equals_growing_cache(trained_model, trained_onnx, tmp_path):
    """Generation over GroupQueryAttention's in-place cache buffers gives the same logits, step by step, as feeding
    each step's present back as past (the path the verification exercises)."""
    prompt = Tokenizer.from_dir(trained_model).encode("Return the number of", add_bos=False)
    for folder in trained_onnx:  # ort fp32, int8, int4
        rt = OnnxRuntime(folder)
        assert rt.kv_in_place
        steps = [int(t) for t in np.random.default_rng(0).integers(0, 2048, 20)]
        runs = []
        for cache in (rt._cache_in_place, rt._growing_cache):
            prefill, step = cache(len(prompt) + len(steps))
            runs.append([prefill(prompt)] + [step(t) for t in steps])
        assert max(float(np.abs(a - b).max()) for a, b in zip(*runs)) == 0.0
    export(_bundle("llama"), tmp_path / "portable", "portable", 20)
    assert not OnnxRuntime(tmp_path / "portable").kv_in_place  # Concat cache: present grows, fed back as past


def test_generate_from_onnx_folder(trained_model, trained_onnx):
    a = run_cli("generate", trained_onnx[0], "-p", "Return the number of", "-n", "16")
    b = run_cli("generate", trained_model, "-p", "Return the number of", "-n", "16")
    assert a.returncode == 0 and b.returncode == 0, a.stderr[-1000:] + b.stderr[-1000:]
    assert a.stdout == b.stdout and "onnxruntime" in a.stderr


def test_bad_inputs_exit_2(tmp_path):
    ckpt = tmp_path / "ckpt"
    save_hf(_bundle("qwen3_moe"), ckpt)
    dest = tmp_path / "out"
    assert "opset 99" in assert_usage_error(run_cli("export", "onnx", ckpt, "-o", dest, "--opset", "99"), dest)
    last = assert_usage_error(run_cli("export", "onnx", ckpt, "-o", dest, "--variant", "ort"), dest)
    assert "--variant portable" in last
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_usage_error(run_cli("export", "onnx", ckpt, "-o", blocker / "out"))
    assert_usage_error(run_cli("quantize", "int4", ckpt, "-o", dest, "--group-size", "48"), dest)
    assert_usage_error(run_cli("quantize", "int8", ckpt, "-o", dest, "--format", "gguf"), dest)

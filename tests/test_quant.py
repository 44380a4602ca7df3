"""Checkpoint quantizers on the session's trained model: INT8 within +0.5 % held-out PPL, GPTQ-4 better than RTN-4
(KLD and PPL), no NaN; the GPTQ-v1 packing read back by an unpacker written here from the format's description and
computed by transformers' own Llama class; GPTQ weights carried into GGUF (Q4_0, losslessly) and ONNX
(MatMulNBits, as they are) with the dequantized model's argmax; bad inputs exit 2."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tests.conftest import assert_usage_error, run_cli
from toolkit.checkpoints import load_checkpoint
from toolkit.core.model import build_model
from toolkit.core.perplexity import perplexity

CALIB = ["--nsamples", "64", "--seqlen", "256"]  # 16k tokens of calib.txt: about 10 s for the 3.7M model
EVAL_TOKENS, CTX = 10**9, 128  # the whole held-out text (44k tokens): PPL differences between 4-bit methods are small


def _quantize(kind, src, dest, *args):
    proc = run_cli("quantize", kind, src, "-o", dest, *args, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return dest


@pytest.fixture(scope="module")
def quantized(trained_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {
        "int8": _quantize("int8", trained_model, root / "int8"),
        "rtn": _quantize("int4", trained_model, root / "rtn", "--method", "rtn"),
        "gptq": _quantize("int4", trained_model, root / "gptq", *CALIB),
        "gptq32": _quantize("int4", trained_model, root / "gptq32", "--group-size", "32", *CALIB),
    }


def _heldout(model_dir):
    bundle = load_checkpoint(model_dir)
    text = (model_dir / "heldout.txt").read_text(encoding="utf-8")
    return bundle.tokenizer.encode(text, add_bos=False)[:EVAL_TOKENS]


def _scored_logprobs(model_dir, tokens):
    """log-softmax of every scored position (second half of each chunk) and the PPL, from the reference model."""
    model = build_model(load_checkpoint(model_dir))
    rows = []

    def logits_fn(group):
        with torch.no_grad():
            out = model(torch.tensor(group)).float()
        rows.append(torch.log_softmax(out[:, CTX // 2:-1], -1))
        return out.numpy()

    ppl = perplexity(logits_fn, tokens, CTX).ppl
    return torch.cat([r.reshape(-1, r.shape[-1]) for r in rows]), ppl


@pytest.fixture(scope="module")
def fp32_scores(trained_model):
    return _scored_logprobs(trained_model, _heldout(trained_model))


def test_int8_within_half_a_percent(trained_model, quantized, fp32_scores):
    folder = quantized["int8"]
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "toolkit_int8" and cfg["bits"] == 8
    tensors = load_file(folder / "model.safetensors")
    weights = [n for n in tensors if n.endswith("q_proj.weight")]
    assert weights and all(tensors[n].dtype == np.int8 for n in weights)
    _, ppl = _scored_logprobs(folder, _heldout(trained_model))
    assert np.isfinite(ppl) and ppl <= fp32_scores[1] * 1.005


def test_gptq_beats_rtn_in_kld_and_ppl(trained_model, quantized, fp32_scores):
    base, base_ppl = fp32_scores
    tokens = _heldout(trained_model)
    results = {}
    for name in ("rtn", "gptq"):
        logp, ppl = _scored_logprobs(quantized[name], tokens)
        assert torch.isfinite(logp).all() and np.isfinite(ppl)
        kld = (base.exp() * (base - logp)).sum(-1).mean().item()
        results[name] = (kld, ppl)
    (kld_rtn, ppl_rtn), (kld_gptq, ppl_gptq) = results["rtn"], results["gptq"]
    assert kld_gptq < kld_rtn and ppl_gptq < ppl_rtn, results
    assert ppl_rtn > base_ppl  # 4 bits cost something: the comparison is not between two copies of fp32


def test_int8_embedding_option(trained_model, quantized, tmp_path):
    """--embed-bits 8: the embedding stored int8 per row (half its bytes), read back as the rounding it is, PPL
    within 0.5 % of the same 4-bit checkpoint with the stored embedding, and still exported by the exporters."""
    folder = _quantize("int4", trained_model, tmp_path / "rtn-e8", "--method", "rtn", "--embed-bits", "8")
    cfg = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert cfg["toolkit_embed_bits"] == 8
    stored = load_file(folder / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == np.int8
    original = load_checkpoint(trained_model).load("model.embed_tokens.weight", torch.float32)
    vocab, hidden = original.shape
    size = (folder / "model.safetensors").stat().st_size
    size16 = (quantized["rtn"] / "model.safetensors").stat().st_size
    saved = size16 - size
    per_item = load_checkpoint(trained_model).tensors["model.embed_tokens.weight"].itemsize
    assert abs(saved - (vocab * hidden * (per_item - 1) - 4 * vocab)) < 4096, (saved, size16, size)
    back = load_checkpoint(folder).load("model.embed_tokens.weight")
    step = original.abs().amax(1, keepdim=True) / 127
    assert ((back - original).abs() <= step / 2 + 1e-7).all()  # round to nearest on each row's grid
    assert (back - original).abs().max() > 0  # and it is a rounding, not a copy
    tokens = _heldout(trained_model)
    _, ppl = _scored_logprobs(folder, tokens)
    _, ppl16 = _scored_logprobs(quantized["rtn"], tokens)
    assert np.isfinite(ppl) and ppl <= ppl16 * 1.005, (ppl, ppl16)
    proc = run_cli("export", "gguf", folder, "-o", tmp_path / "e8.gguf", "--outtype", "q8_0")
    assert proc.returncode == 0, proc.stderr[-2000:]  # verified against the dequantized weights
    dest = tmp_path / "bad"
    assert "--embed-bits 4" in assert_usage_error(
        run_cli("quantize", "int4", trained_model, "-o", dest, "--embed-bits", "4"), dest)


def _unpack_gptq_v1(qweight, qzeros, scales, g_idx):
    """Independent reading of the GPTQ-v1 layout, element by element in numpy: qweight[i // 8, o] holds input row i
    in bits 4 * (i % 8); qzeros[g, o // 8] holds zero - 1 of output column o in bits 4 * (o % 8)."""
    qweight, qzeros = qweight.view(np.uint32), qzeros.view(np.uint32)
    rows, out = qweight.shape[0] * 8, qweight.shape[1]
    i = np.arange(rows)[:, None]
    codes = (qweight[i // 8, np.arange(out)[None, :]] >> (4 * (i % 8)).astype(np.uint32)) & 0xF
    o = np.arange(out)[None, :]
    zeros = ((qzeros[:, o[0] // 8] >> (4 * (o % 8)).astype(np.uint32)) & 0xF) + 1
    w = scales.astype(np.float32)[g_idx] * (codes.astype(np.float32) - zeros[g_idx].astype(np.float32))
    return w.T  # [out, in]


def test_gptq_packing_read_independently_by_transformers_llama(trained_model, quantized):
    """GPTQModel (which transformers needs for quant_method gptq) cannot be installed beside the pinned torch, so the
    packing is proven here: unpack every layer with the reader above, load the result into transformers'
    LlamaForCausalLM and compare its logits with this project's dequantized model."""
    import transformers

    folder = quantized["gptq"]
    cfg = json.loads((folder / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"]) == ("gptq", 4, 128, True)
    tensors = load_file(folder / "model.safetensors")
    state = {}
    for name, arr in tensors.items():
        if name.endswith(".qweight"):
            p = name[: -len("qweight")]
            assert arr.dtype == np.int32 and tensors[p + "scales"].dtype == np.float16
            assert (tensors[p + "g_idx"] == np.arange(arr.shape[0] * 8) // 128).all()
            state[p + "weight"] = torch.from_numpy(_unpack_gptq_v1(arr, tensors[p + "qzeros"], tensors[p + "scales"],
                                                                   tensors[p + "g_idx"]))
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            state[name] = torch.from_numpy(arr.copy()).float()
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**plain)).eval()
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m or "rotary" in m for m in missing)
    hf.tie_weights()
    ids = torch.tensor([_heldout(trained_model)[:96]])
    with torch.no_grad():
        theirs = hf(ids).logits
        ours = build_model(load_checkpoint(folder))(ids)
    assert (theirs - ours).abs().max().item() <= 1e-2
    assert theirs.abs().max() > 1.0


def _argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).mean())


def test_gptq_checkpoint_exports_keep_its_numbers(trained_model, quantized, tmp_path):
    from runtimes.llama_cpp import LlamaCppRuntime
    from runtimes.onnxruntime import OnnxRuntime

    tokens = _heldout(trained_model)[:256]
    folder = quantized["gptq32"]
    with torch.no_grad():
        ref = build_model(load_checkpoint(folder))(torch.tensor([tokens]))[0].numpy()
    gguf_file = tmp_path / "m.gguf"
    proc = run_cli("export", "gguf", folder, "-o", gguf_file, "--outtype", "q4_0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "m.manifest.json").read_text())
    assert "lossless" in manifest["details"]["from_quantized_checkpoint"]
    assert manifest["quantization"]["method"] == "GPTQ codes repacked into Q4_0"
    onnx_dir = tmp_path / "onnx"
    proc = run_cli("export", "onnx", folder, "-o", onnx_dir, "--variant", "ort")
    assert proc.returncode == 0, proc.stderr[-2000:]  # verified within 1e-4 against the dequantized weights
    meta = json.loads((onnx_dir / "manifest.json").read_text())
    assert "imported into 16 MatMulNBits" in meta["details"]["from_quantized_checkpoint"]
    assert meta["dtype"] == "int4" and meta["quantization"]["group_size"] == 32  # 4 layers x (qkv, o, gate_up, down)
    for rt in (LlamaCppRuntime(gguf_file), OnnxRuntime(onnx_dir)):
        assert _argmax_agreement(rt.logits(tokens), ref) >= 0.97


def test_bad_quantization_inputs_exit_2(trained_model, quantized, tmp_path):
    dest = tmp_path / "out"
    assert "does not divide" in assert_usage_error(
        run_cli("quantize", "int4", trained_model, "-o", dest, "--group-size", "96"), dest)
    short = tmp_path / "short.txt"
    short.write_text("too short")
    assert "less than one sample" in assert_usage_error(
        run_cli("quantize", "int4", trained_model, "-o", dest, "--calib", short), dest)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "is empty" in assert_usage_error(run_cli("quantize", "int4", trained_model, "-o", dest, "--calib", empty),
                                            dest)
    assert "already quantized" in assert_usage_error(run_cli("quantize", "int8", quantized["rtn"], "-o", dest), dest)


def test_gptq_folders_of_other_tools_v2_and_desc_act(trained_model, quantized, tmp_path):
    """Two layouts other GPTQ tools write. GPTQModel's v2 (`checkpoint_format: gptq_v2`) stores each zero point
    itself where v1 stores zero - 1: made here from the v1 folder the way GPTQModel converts (every 4-bit field of
    qzeros + 1, i.e. + 0x11111111 per int32), it must load to the same weights, and read as v1 it would not.
    AutoGPTQ's act-order without static groups (g_idx not i // group): MatMulNBits' blocks are consecutive columns, so
    the ONNX export must not import those codes as they are; it falls back and still verifies."""
    import shutil

    from safetensors.numpy import save_file

    src = quantized["gptq32"]
    reference = load_checkpoint(src)
    names = [n for n in reference.tensors if n.endswith("proj.weight")]

    def variant(name, edit, qc_edit):
        folder = tmp_path / name
        shutil.copytree(src, folder)
        tensors = load_file(folder / "model.safetensors")
        save_file({k: edit(k, v) for k, v in tensors.items()}, folder / "model.safetensors")
        cfg = json.loads((folder / "config.json").read_text())
        qc_edit(cfg["quantization_config"])
        (folder / "config.json").write_text(json.dumps(cfg))
        return folder

    plus_one = lambda k, v: (v.view(np.uint32) + np.uint32(0x11111111)).view(np.int32) if k.endswith(".qzeros") else v
    v2 = variant("v2", plus_one, lambda qc: qc.update(checkpoint_format="gptq_v2"))
    as_v1 = variant("v2-read-as-v1", plus_one, lambda qc: None)
    got, wrong = load_checkpoint(v2), load_checkpoint(as_v1)
    for n in names:
        assert torch.equal(got.load(n, torch.float32), reference.load(n, torch.float32)), n
        assert not torch.equal(wrong.load(n, torch.float32), reference.load(n, torch.float32)), n
    proc = run_cli("export", "onnx", v2, "-o", tmp_path / "v2-onnx", "--variant", "ort")
    assert proc.returncode == 0, proc.stderr[-2000:]  # verified within 1e-4 against the dequantized weights
    meta = json.loads((tmp_path / "v2-onnx" / "manifest.json").read_text())
    assert "imported into 16 MatMulNBits" in meta["details"]["from_quantized_checkpoint"]
    bad = tmp_path / "marlin"
    variant("marlin", lambda k, v: v, lambda qc: qc.update(checkpoint_format="marlin"))
    assert "checkpoint_format 'marlin'" in assert_usage_error(run_cli("export", "onnx", bad, "-o", bad / "x"),
                                                               bad / "x")

    roll = lambda k, v: np.roll(v, 16).astype(v.dtype) if k.endswith(".g_idx") else v  # noqa: E731
    desc = variant("desc-act", roll, lambda qc: qc.update(desc_act=True, static_groups=False))
    proc = run_cli("export", "onnx", desc, "-o", tmp_path / "desc-onnx", "--variant", "ort")
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = json.loads((tmp_path / "desc-onnx" / "manifest.json").read_text())
    assert meta["details"]["from_quantized_checkpoint"] == "the checkpoint's dequantized weights, in fp32"

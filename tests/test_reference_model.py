"""The reference model against transformers' classes (the oracle) on the same weights, fp32, within 1e-4:
prefill and 8 cached decode steps. MiniMind2-MoE, which transformers lacks, against a straightforward
implementation written here, and through the Qwen2-MoE form it is saved as."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from tests.helpers import random_bundle
from toolkit.checkpoints import load_checkpoint
from toolkit.checkpoints.hf_writer import save_hf
from toolkit.core.model import KVCache, build_model

TOL = 1e-4
PREFILL, DECODE = 24, 8


def _hf_model(bundle, tmp_path):
    save_hf(bundle, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(model).__name__ == bundle.config.fam.hf_architecture
    return model


def _ours_prefill_then_decode(model, ids):
    cache = KVCache(model.config, ids.shape[0], ids.shape[1], torch.float32, "cpu")
    outs = [model(ids[:, :PREFILL], cache=cache)]
    for t in range(PREFILL, ids.shape[1]):
        outs.append(model(ids[:, t:t + 1], cache=cache))
    return torch.cat(outs, 1)


def _hf_prefill_then_decode(hf, ids):
    out = hf(ids[:, :PREFILL], use_cache=True)
    logits, past = [out.logits], out.past_key_values
    for t in range(PREFILL, ids.shape[1]):
        out = hf(ids[:, t:t + 1], past_key_values=past, use_cache=True)
        logits.append(out.logits)
        past = out.past_key_values
    return torch.cat(logits, 1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "nanochat"])
@pytest.mark.parametrize("tied", [False, True])
def test_matches_transformers(family, tied, tmp_path):
    if family == "nanochat" and tied:
        pytest.skip("NanoChat's head is never tied")
    bundle = random_bundle(family, seed=3, tie_word_embeddings=tied)
    hf = _hf_model(bundle, tmp_path)
    ours = build_model(bundle)
    ids = torch.randint(0, bundle.config.vocab_size, (2, PREFILL + DECODE), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        assert ref.abs().max() > 1.0  # logits carry signal, so a tolerance of 1e-4 means something
        assert (ours(ids) - ref).abs().max().item() <= TOL
        cached_ref = _hf_prefill_then_decode(hf, ids)
        cached = _ours_prefill_then_decode(ours, ids)
    assert (cached - cached_ref).abs().max().item() <= TOL
    assert (cached - ref).abs().max().item() <= TOL


def test_reloaded_hf_directory_is_identical(tmp_path):
    bundle = random_bundle("qwen3", seed=5)
    save_hf(bundle, tmp_path / "hf")
    again = load_checkpoint(tmp_path / "hf")
    assert again.config.family == "qwen3"
    for name in bundle.tensors:
        assert torch.equal(bundle.load(name), again.load(name)), name


def test_left_padded_batch_matches_unpadded_rows():
    bundle = random_bundle("llama", seed=7)
    model = build_model(bundle)
    g = torch.Generator().manual_seed(1)
    a = torch.randint(3, 300, (1, 12), generator=g)
    b = torch.randint(3, 300, (1, 7), generator=g)
    pad = torch.zeros(1, 5, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.cat([torch.ones(1, 12), torch.cat([torch.zeros(1, 5), torch.ones(1, 7)], 1)]).long()
    with torch.no_grad():
        cache = KVCache(bundle.config, 2, 20, torch.float32, "cpu")
        got = model(batch, cache=cache, attention_mask=mask)
        steps = [got[:, -1:]]
        nxt = torch.tensor([[5], [6]])
        for _ in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            steps.append(model(nxt, cache=cache, attention_mask=mask))
        ref_a = model(torch.cat([a, torch.tensor([[5, 5, 5]])], 1))
        ref_b = model(torch.cat([b, torch.tensor([[6, 6, 6]])], 1))
    assert (got[0] - ref_a[0, :12]).abs().max() <= TOL
    assert (got[1, 5:] - ref_b[0, :7]).abs().max() <= TOL
    dec = torch.cat(steps, 1)
    assert (dec[0] - ref_a[0, 11:]).abs().max() <= TOL
    assert (dec[1] - ref_b[0, 6:]).abs().max() <= TOL


def _independent_minimind2_moe(weights, cfg, ids):
    """MiniMind2-MoE written plainly: per token, softmax router, top-k renormalised, plus the un-gated shared expert."""
    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    def mlp(x, p):
        return F.linear(F.silu(F.linear(x, weights[p + "gate_proj.weight"])) * F.linear(x, weights[p + "up_proj.weight"]),
                        weights[p + "down_proj.weight"])

    T, hd, nh, nkv = ids.shape[1], cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    x = weights["model.embed_tokens.weight"][ids[0]]
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.arange(T).float()[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(t):  # [T, h, hd]
        t1, t2 = t[..., :hd // 2], t[..., hd // 2:]
        return t * cos[:, None] + torch.cat([-t2, t1], -1) * sin[:, None]

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        h = rms(x, weights[p + "input_layernorm.weight"])
        q = rope(F.linear(h, weights[p + "self_attn.q_proj.weight"]).view(T, nh, hd))
        k = rope(F.linear(h, weights[p + "self_attn.k_proj.weight"]).view(T, nkv, hd))
        v = F.linear(h, weights[p + "self_attn.v_proj.weight"]).view(T, nkv, hd)
        heads = []
        for hh in range(nh):
            kv = hh // (nh // nkv)
            s = q[:, hh] @ k[:, kv].T / hd ** 0.5
            s = s.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            heads.append(torch.softmax(s, -1) @ v[:, kv])
        x = x + F.linear(torch.cat(heads, -1), weights[p + "self_attn.o_proj.weight"])
        h = rms(x, weights[p + "post_attention_layernorm.weight"])
        out = torch.zeros_like(h)
        for t in range(T):
            probs = torch.softmax(F.linear(h[t], weights[p + "mlp.gate.weight"]), -1)
            w, e = probs.topk(cfg.num_experts_per_tok)
            w = w / w.sum()
            for wj, ej in zip(w, e):
                out[t] += wj * mlp(h[t], f"{p}mlp.experts.{int(ej)}.")
            out[t] += mlp(h[t], p + "mlp.shared_expert.")
        x = x + out
    x = rms(x, weights["model.norm.weight"])
    return F.linear(x, weights.get("lm_head.weight", weights["model.embed_tokens.weight"]))


def test_minimind2_moe_matches_independent_implementation_and_transformers(tmp_path):
    bundle = random_bundle("minimind2_moe", seed=11)
    weights = {n: bundle.load(n) for n in bundle.tensors}
    ids = torch.randint(0, 320, (1, PREFILL + DECODE), generator=torch.Generator().manual_seed(2))
    ours = build_model(bundle)
    with torch.no_grad():
        ref = _independent_minimind2_moe(weights, bundle.config, ids)
        assert (ours(ids)[0] - ref).abs().max().item() <= TOL
        assert (_ours_prefill_then_decode(ours, ids)[0] - ref).abs().max().item() <= TOL
        hf = _hf_model(bundle, tmp_path)  # saved as Qwen2-MoE: zero gate and biases, doubled shared down proj
        assert (hf(ids).logits[0] - ref).abs().max().item() <= TOL


def test_qwen3_moe_config_without_norm_topk_prob_follows_transformers(tmp_path):
    import json

    bundle = random_bundle("qwen3_moe", seed=9, norm_topk_prob=False)
    save_hf(bundle, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["norm_topk_prob"]  # transformers' default applies: False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = build_model(load_checkpoint(tmp_path / "hf"))
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= TOL

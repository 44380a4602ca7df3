"""CUDA paths: training with autocast, the reference model in half precision against fp32, the CUDA-graph decode.
Skipped without CUDA."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import random_bundle
from toolkit.app.train import TrainOptions, train
from toolkit.checkpoints import load_checkpoint
from toolkit.core.model import KVCache, build_model

pytestmark = pytest.mark.gpu


def test_cuda_training_with_autocast(tmp_path):
    out = tmp_path / "run"
    summary = train(TrainOptions(out=str(out), device="cuda", hidden_size=128, num_layers=2, num_heads=2,
                                 num_kv_heads=1, intermediate_size=256, vocab_size=1024, seq_len=128, batch_size=32,
                                 steps=120, warmup=10, eval_every=40, save_every=120))
    assert summary["device"].startswith("cuda")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ppls = [r["heldout_ppl"] for r in log if "heldout_ppl" in r]
    assert ppls[-1] < 0.8 * ppls[0], ppls
    bundle = load_checkpoint(out)
    assert bundle.dtypes() == {"float32": bundle.num_parameters()}  # master weights stay fp32 under autocast


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-2), (torch.bfloat16, 2e-1)])
def test_half_precision_on_cuda_tracks_fp32(dtype, tol):
    bundle = random_bundle("qwen3", seed=2)
    ref_model = build_model(bundle)
    model = build_model(bundle, dtype, "cuda")
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(ids)
        full = model(ids.cuda()).float().cpu()
        cache = KVCache(bundle.config, 2, 40, dtype, "cuda")
        parts = [model(ids[:, :32].cuda(), cache=cache)]
        for t in range(32, 40):
            parts.append(model(ids[:, t:t + 1].cuda(), cache=cache))
        cached = torch.cat(parts, 1).float().cpu()
    assert (full - ref).abs().max().item() < tol
    assert (cached - ref).abs().max().item() < tol
    assert (full.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


def test_cuda_graph_decode_matches_reference():
    """The recorded decode step, replayed on CUDA, against the reference model's eager cached decode (fp32, CPU)."""
    from runtimes.torch_runtime.static_decode import GraphDecoder
    from tests.test_static_decode import reference_decode
    from toolkit.core.sampling import make_sampler

    bundle = random_bundle("qwen2", seed=5)
    g = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 320, (30,), generator=g).tolist()
    cont = torch.randint(0, 320, (20,), generator=g).tolist()
    ref = reference_decode(build_model(bundle), prompt, cont)
    dec = GraphDecoder(build_model(bundle, torch.float32, "cuda"), 256)
    assert dec.graph is not None
    dec.prefill(prompt)
    seen = []

    def forced(logits):  # records each step's logits and feeds the fixed continuation
        seen.append(logits)
        return cont[len(seen)]

    ids, _ = dec.decode(cont[0], len(cont), forced)
    assert ids == cont
    assert np.abs(np.stack(seen) - ref[:-1].numpy()).max() < 1e-3
    # greedy on the device gives the tokens host-side greedy gives
    greedy = make_sampler(0.0)
    host = GraphDecoder(build_model(bundle, torch.float32, "cuda"), 256)
    first = greedy(host.prefill(prompt))
    want, _ = host.decode(first, 50, lambda x: int(np.argmax(x)))
    dec.prefill(prompt)
    got, _ = dec.decode(first, 50, greedy, greedy=True)
    assert got == want


def test_fused_triton_gemv_and_fused_step():
    """Triton matrix-vector kernels (norm / SiLU-gate / residual folded in) against torch, then the fused decode
    step against the reference model's cached decode."""
    pytest.importorskip("triton")
    from runtimes.torch_runtime.static_decode import GraphDecoder
    from runtimes.torch_runtime.triton_gemv import gemv
    from tests.test_static_decode import reference_decode
    from toolkit.core.sampling import make_sampler

    g = torch.Generator(device="cuda").manual_seed(0)
    for N, K in ((2560, 1536), (1536, 4096), (300, 96)):
        w = torch.randn(N, K, device="cuda", generator=g, dtype=torch.float16) * 0.05
        x = torch.randn(K, device="cuda", generator=g, dtype=torch.float16)
        gain = 1 + 0.3 * torch.randn(K, device="cuda", generator=g, dtype=torch.float16)
        r = torch.randn(N, device="cuda", generator=g, dtype=torch.float16)
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean() + 1e-5) * gain.float()
        ab = torch.randn(2 * K, device="cuda", generator=g, dtype=torch.float16)
        glu = torch.nn.functional.silu(ab[:K].float()) * ab[K:].float()
        for got, want in ((gemv(x, w), w.float() @ xf),
                          (gemv(x, w, norm=gain, norm_eps=1e-5), w.float() @ normed),
                          (gemv(ab, w, glu=True, residual=r), r.float() + w.float() @ glu)):
            assert (got.float() - want).abs().max().item() < 2e-2 * max(1.0, want.abs().max().item())
    # the fused step (Triton products and attention kernel) on families with biases, QK-norm, tied embeddings, and
    # with a prompt longer than one block of the attention kernel's loop (64 slots)
    for family, n_prompt in (("qwen2", 30), ("qwen3", 100), ("llama", 70)):
        bundle = random_bundle(family, seed=6, hidden_size=128, intermediate_size=256, head_dim=32,
                               tie_word_embeddings=family == "llama")
        prompt, cont = [(7 * i) % 300 + 3 for i in range(n_prompt)], list(range(40, 56))
        ref = reference_decode(build_model(bundle), prompt, cont)
        dec = GraphDecoder(build_model(bundle, torch.float32, "cuda"), 256, fused=True)
        assert dec.step.fused
        dec.prefill(prompt)
        seen = []
        dec.decode(cont[0], len(cont), lambda logits: (seen.append(logits), cont[len(seen)])[1])
        assert np.abs(np.stack(seen) - ref[:-1].numpy()).max() < 1e-3, family
        # greedy on the device (the fused argmax kernel) = greedy on the host over the unfused step
        host = GraphDecoder(build_model(bundle, torch.float32, "cuda"), 256)
        first = int(np.argmax(host.prefill(prompt)))
        want, _ = host.decode(first, 60, lambda x: int(np.argmax(x)))
        dec.prefill(prompt)
        got, _ = dec.decode(first, 60, make_sampler(0.0), greedy=True)
        assert got == want, family


def _attention_reference(qkv, k_cache, v_cache, inv_freq, pos, nh, nkv, hd, q_norm, k_norm, eps):
    """One token's attention in float64 with torch's ops: the function the Triton attention kernel computes."""
    from toolkit.core.model import rotate_half

    x = qkv.double()
    q, k, v = x[:nh * hd].view(nh, hd), x[nh * hd:(nh + nkv) * hd].view(nkv, hd), x[(nh + nkv) * hd:].view(nkv, hd)
    if q_norm is not None:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + eps) * q_norm.double()
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_norm.double()
    angle = pos * inv_freq.double()
    cos, sin = torch.cat([angle, angle]).cos(), torch.cat([angle, angle]).sin()
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    keys = torch.cat([k_cache[0, :, :pos].double(), k[:, None]], dim=1)  # [nkv, pos + 1, hd]
    vals = torch.cat([v_cache[0, :, :pos].double(), v[:, None]], dim=1)
    qg = q.view(nkv, nh // nkv, hd)
    weights = torch.softmax(qg @ keys.transpose(1, 2) * hd ** -0.5, dim=-1)
    return (weights @ vals).reshape(nh * hd), k, v


def test_triton_attention_kernel_over_split_contexts():
    """The attention kernel splits a head's cache slots over programs (64 each) and merges their partial softmaxes
    in the last program to finish: against float64 attention at positions on and around split edges, with more
    splits than one merge block, GQA and QK-norm; the new key/value land in slot `pos`; the per-head counters are
    left at zero for the next call (a stale counter would skip the merge)."""
    pytest.importorskip("triton")
    from runtimes.torch_runtime.triton_gemv import attend, attend_scratch

    g = torch.Generator(device="cuda").manual_seed(3)
    for nh, nkv, hd, capacity, qk_norm in ((12, 4, 128, 4096, False), (8, 8, 64, 1024, True)):
        k_cache = torch.randn(1, nkv, capacity, hd, device="cuda", generator=g, dtype=torch.float16)
        v_cache = torch.randn(1, nkv, capacity, hd, device="cuda", generator=g, dtype=torch.float16)
        inv_freq = 1e4 ** -(torch.arange(0, hd, 2, device="cuda").float() / hd)
        qn = 1 + 0.2 * torch.randn(hd, device="cuda", generator=g) if qk_norm else None
        kn = 1 + 0.2 * torch.randn(hd, device="cuda", generator=g) if qk_norm else None
        scratch = attend_scratch(nh, hd, capacity, "cuda")
        for pos in (0, 1, 63, 64, 65, 200, 1023, capacity - 1 if capacity > 1024 else 700):
            qkv = torch.randn((nh + 2 * nkv) * hd, device="cuda", generator=g, dtype=torch.float16)
            want, k_new, v_new = _attention_reference(qkv, k_cache, v_cache, inv_freq, pos, nh, nkv, hd, qn, kn,
                                                      1e-6)
            got = attend(qkv, k_cache, v_cache, inv_freq, 1, torch.tensor([pos], device="cuda"), nh, nkv, hd,
                         qn, kn, 1e-6, scratch)
            torch.cuda.synchronize()
            assert (got.double() - want).abs().max().item() < 5e-3, (nh, pos)
            assert (k_cache[0, :, pos].double() - k_new).abs().max().item() < 5e-3
            assert torch.equal(v_cache[0, :, pos].double(), v_new)
            assert int(scratch[1].abs().sum()) == 0

"""Batch-1 decoding kernels for CUDA (Triton): matrix-vector products with the work around them fused in, and one
attention kernel per layer.

A decode step multiplies each weight matrix by one vector, so it is bound by reading the weights, and every small
elementwise kernel between the products costs a launch (measured on an H100, docs/BENCHMARKS.md: a CUDA graph of
torch's own kernels decodes the 413M benchmark model at 15 % of the bandwidth roof, one of these kernels at 45 %).
`gemv` streams the weight rows once (fp32 accumulation) and folds in what sits next to a product in a decoder
layer:

- norm:     y = W · rmsnorm(x) · g      (the RMSNorm before the product: every program sums x² as it streams,
                                       and scales its outputs by 1/rms(x) at the end)
- glu:      y = W · (silu(a) ⊙ b)       (x = [a, b], the fused gate/up output)
- residual: y = r + W · x               (the residual add after o_proj and down_proj)

`attend` does a layer's attention for the one new token in one launch: QK-norm, RoPE, the key/value written into
the cache slot, and softmax attention over the slots before it (online softmax), one program per query head.

Imported only on CUDA machines with Triton (not a dependency of the CPU install).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((2, 1024, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 3), (4, 1024, 8, 4), (8, 256, 4, 3),
                                  (8, 512, 4, 3), (8, 512, 8, 4), (8, 1024, 8, 3), (16, 256, 4, 4), (16, 512, 8, 3),
                                  (32, 256, 8, 3))]


@triton.autotune(configs=_CONFIGS, key=["N", "K", "NORM", "GLU", "RES"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, g_ptr, r_ptr, y_ptr, N, K, eps,
                 NORM: tl.constexpr, NORM_W: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    ss = tl.zeros([BLOCK_K], dtype=tl.float32)  # sum of squares of x, for the norm
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        if GLU:
            a = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0).to(tl.float32)
            h = a * tl.sigmoid(a) * b
        else:
            h = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if NORM:
                ss += h * h
                if NORM_W:
                    h = h * tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * h[None, :]
    y = tl.sum(acc, axis=1)
    if NORM:  # W (x g / rms(x)) = (W (x g)) / rms(x): the scale is one number, applied after the products
        y = y / tl.sqrt(tl.sum(ss, axis=0) / K + eps)
    if RES:
        y += tl.load(r_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)


def gemv(x: torch.Tensor, w: torch.Tensor, *, norm: torch.Tensor | None = None, norm_eps: float | None = None,
         glu: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
    """W [N, K] times the vector x (K values; 2K with glu) -> [N] in W's dtype. `norm`: the RMSNorm weight [K]
    (or pass norm_eps alone for a weightless norm)."""
    N, K = w.shape
    x = x.reshape(-1)
    y = torch.empty(N, dtype=w.dtype, device=w.device)
    use_norm = norm is not None or norm_eps is not None
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x, w, norm if norm is not None else x, residual.reshape(-1) if residual is not None else y,
                       y, N, K, float(norm_eps or 0.0), NORM=use_norm, NORM_W=norm is not None, GLU=glu,
                       RES=residual is not None)
    return y


@triton.jit
def _attend_kernel(qkv_ptr, k_ptr, v_ptr, inv_freq_ptr, pos_ptr, qn_ptr, kn_ptr, out_ptr, C, eps, scale, rope_sign,
                   NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr, QK_NORM: tl.constexpr,
                   BLOCK_S: tl.constexpr):
    h = tl.program_id(0)
    kvh = h // (NH // NKV)
    pos = tl.load(pos_ptr)
    d = tl.arange(0, HD)
    partner = (d + HD // 2) % HD  # rotate_half(x)[d] = -x[d + hd/2] for the first half, x[d - hd/2] after
    sign = tl.where(d < HD // 2, -1.0, 1.0)
    angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + d % (HD // 2))  # fp32, as the reference computes it
    cos = tl.cos(angle)
    sin = tl.sin(angle) * rope_sign
    q_at = qkv_ptr + h * HD
    k_at = qkv_ptr + NH * HD + kvh * HD
    q = tl.load(q_at + d).to(tl.float32)
    qp = tl.load(q_at + partner).to(tl.float32)
    k = tl.load(k_at + d).to(tl.float32)
    kp = tl.load(k_at + partner).to(tl.float32)
    v = tl.load(qkv_ptr + (NH + NKV) * HD + kvh * HD + d).to(tl.float32)
    if QK_NORM:  # per-head RMSNorm before the rotation (Qwen3)
        rq = 1.0 / tl.sqrt(tl.sum(q * q, axis=0) / HD + eps)
        rk = 1.0 / tl.sqrt(tl.sum(k * k, axis=0) / HD + eps)
        q, qp = q * rq * tl.load(qn_ptr + d).to(tl.float32), qp * rq * tl.load(qn_ptr + partner).to(tl.float32)
        k, kp = k * rk * tl.load(kn_ptr + d).to(tl.float32), kp * rk * tl.load(kn_ptr + partner).to(tl.float32)
    q = q * cos + sign * qp * sin
    k = k * cos + sign * kp * sin
    cache_k = k_ptr + kvh * C * HD
    cache_v = v_ptr + kvh * C * HD
    if h % (NH // NKV) == 0:  # one program per kv head writes the slot; the others read only the slots before it
        tl.store(cache_k + pos * HD + d, k.to(k_ptr.dtype.element_ty))
        tl.store(cache_v + pos * HD + d, v.to(v_ptr.dtype.element_ty))
    # the new token's own key/value from registers, the earlier ones from the cache
    m_i = tl.sum(q * k, axis=0) * scale
    l_i = m_i * 0.0 + 1.0  # a tensor, like the value the loop carries
    acc = v
    for s0 in range(0, pos, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        ok = s < pos
        keys = tl.load(cache_k + s[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        scores = tl.where(ok, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=0))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new)
        vals = tl.load(cache_v + s[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * vals, axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    tl.store(out_ptr + h * HD + d, (acc / l_i).to(out_ptr.dtype.element_ty))


def attend(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, inv_freq: torch.Tensor, rope_sign: int,
           pos: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, q_norm: torch.Tensor | None = None,
           k_norm: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    """One token's attention: qkv [(nh + 2 nkv) hd] -> [nh hd]; k/v_cache [1, nkv, C, hd] (slot `pos` written);
    inv_freq [hd/2] float32 (RoPE angle = pos * inv_freq, sin negated for rope_sign -1); pos [1] int64."""
    out = torch.empty(num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    qk = q_norm is not None
    _attend_kernel[(num_heads,)](qkv, k_cache, v_cache, inv_freq, pos, q_norm if qk else inv_freq,
                                 k_norm if qk else inv_freq, out, k_cache.shape[2], float(eps), head_dim ** -0.5,
                                 float(rope_sign), NH=num_heads, NKV=num_kv_heads, HD=head_dim, QK_NORM=qk,
                                 BLOCK_S=128, num_warps=8)
    return out


@triton.jit
def _greedy_advance_kernel(logits_ptr, token_ptr, pos_ptr, generated_ptr, V, BLOCK: tl.constexpr):
    best = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    best_i = tl.sum(tl.zeros([BLOCK], tl.int64), axis=0)
    for v0 in range(0, V, BLOCK):
        idx = v0 + tl.arange(0, BLOCK)
        vals = tl.load(logits_ptr + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
        m = tl.max(vals, axis=0)
        i = tl.argmax(vals, axis=0, tie_break_left=True) + v0
        take = m > best  # strictly greater: the first maximum wins, as torch.argmax and numpy.argmax choose
        best_i = tl.where(take, i.to(tl.int64), best_i)
        best = tl.where(take, m, best)
    pos = tl.load(pos_ptr)
    tl.store(token_ptr, best_i)
    tl.store(generated_ptr + pos + 1, best_i)
    tl.store(pos_ptr, pos + 1)


def greedy_advance(logits: torch.Tensor, token: torch.Tensor, pos: torch.Tensor, generated: torch.Tensor) -> None:
    """After a step: token <- argmax(logits) (first maximum), generated[pos + 1] <- token, pos <- pos + 1; one
    launch instead of torch's argmax, index_copy, copy and add."""
    _greedy_advance_kernel[(1,)](logits, token, pos, generated, logits.numel(), BLOCK=4096, num_warps=8)

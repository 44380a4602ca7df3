"""Batch-1 decoding kernels for CUDA (Triton): matrix-vector products with the work around them fused in, and one
attention kernel per layer.

A decode step multiplies each weight matrix by one vector, so it is bound by reading the weights, and every small
elementwise kernel between the products costs a launch (measured on an H100, docs/BENCHMARKS.md: a CUDA graph of
torch's own kernels decodes the 413M benchmark model at 15 % of the bandwidth roof, these kernels at 59 %).
`gemv` streams the weight rows once (fp32 accumulation) and folds in what sits next to a product in a decoder
layer:

- norm:     y = W · rmsnorm(x) · g      (the RMSNorm before the product: every program sums x² as it streams,
                                       and scales its outputs by 1/rms(x) at the end)
- glu:      y = W · (silu(a) ⊙ b)       (x = [a, b], the fused gate/up output)
- residual: y = r + W · x               (the residual add after o_proj and down_proj)

`attend` does a layer's attention for the one new token in one launch: QK-norm, RoPE, the key/value written into
the cache slot, and softmax attention over the slots before it, split over programs of 64 slots whose partial
softmaxes the last one to finish merges (latency no longer grows a memory round trip per 64-128 slots).

On Hopper and newer the kernels are launched with programmatic dependent launch: a kernel starts while the one
before it finishes, reads its own weights, and waits (`gdc_wait`) only before reading what that one wrote. A step of
the 413M model is 82 small kernels; overlapping them took it from 1,588 to 1,789 tok/s (measured before the split
attention).

Imported only on CUDA machines with Triton (not a dependency of the CPU install).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def _pdl_available() -> bool:
    """Programmatic dependent launch: Hopper and newer, and a Triton that has the grid-dependency instructions."""
    try:
        from triton.language.extra import cuda as cuda_extra
    except ImportError:
        return False
    return torch.cuda.get_device_capability()[0] >= 9 and hasattr(cuda_extra, "gdc_wait")


# Each kernel here waits for the one before it only where it first reads what that one wrote (`gdc_wait`), and lets
# the next one launch from then on, so launches and weight reads overlap the previous kernel's tail; in a decode
# step of small products those gaps are a large part of the time. None: on where available; False: plain launches
# (the benchmark compares both).
USE_PDL: bool | None = None


def _pdl() -> bool:
    global USE_PDL
    if USE_PDL is None:
        USE_PDL = _pdl_available()
    return USE_PDL


_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in ((2, 1024, 4, 3), (4, 512, 4, 3), (4, 1024, 4, 3), (4, 1024, 8, 4), (8, 256, 4, 3),
                                  (8, 512, 4, 3), (8, 512, 8, 4), (8, 1024, 8, 3), (16, 256, 4, 4), (16, 512, 8, 3),
                                  (32, 256, 8, 3),
                                  # a whole row block in one tile: all of a program's weights are read before it
                                  # waits for the kernel before (widths up to 2048 / 4096)
                                  (2, 2048, 4, 1), (4, 2048, 4, 1), (4, 2048, 8, 1), (8, 2048, 8, 1), (2, 4096, 4, 1),
                                  (2, 4096, 8, 1), (4, 4096, 8, 1))]


@triton.jit
def _input_tile(x_ptr, g_ptr, cols, col_ok, K, NORM: tl.constexpr, NORM_W: tl.constexpr, GLU: tl.constexpr):
    """The vector's values under `cols` as the product sees them (SiLU gate applied, norm weight applied) and
    their squares for the norm's sum."""
    if GLU:
        a = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + K + cols, mask=col_ok, other=0.0).to(tl.float32)
        h = a * tl.sigmoid(a) * b
        sq = h * 0.0
    else:
        h = tl.load(x_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        sq = h * h
        if NORM_W:
            h = h * tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return h, sq


@triton.autotune(configs=_CONFIGS, key=["N", "K", "NORM", "GLU", "RES", "GDC"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, g_ptr, r_ptr, y_ptr, N, K, eps,
                 NORM: tl.constexpr, NORM_W: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                 GDC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < K
    # the first weight tile is read before waiting for the kernel before this one (programmatic dependent launch):
    # weights never depend on it, so this kernel's start and first reads overlap the previous kernel's tail
    w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if GDC:
        tl.extra.cuda.gdc_wait()  # everything the previous kernel wrote is visible after this
        tl.extra.cuda.gdc_launch_dependents()
    h, sq = _input_tile(x_ptr, g_ptr, cols, col_ok, K, NORM, NORM_W, GLU)
    acc = w.to(tl.float32) * h[None, :]
    ss = sq  # sum of squares of x, for the norm
    for k0 in range(BLOCK_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < K
        h, sq = _input_tile(x_ptr, g_ptr, cols, col_ok, K, NORM, NORM_W, GLU)
        ss += sq
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
                       RES=residual is not None, GDC=_pdl(), launch_pdl=_pdl())
    return y


ATTEND_SPLIT = 64  # cache slots per attention program: a head's earlier slots are split over programs that run at once


@triton.jit
def _rotated_head(at_ptr, norm_ptr, d, partner, sign, cos, sin, eps, HD: tl.constexpr, QK_NORM: tl.constexpr):
    """One head's query or key at `at_ptr`: per-head RMSNorm when QK_NORM (Qwen3), then RoPE (rotate_half layout)."""
    x = tl.load(at_ptr + d).to(tl.float32)
    xp = tl.load(at_ptr + partner).to(tl.float32)
    if QK_NORM:
        r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / HD + eps)
        x, xp = x * r * tl.load(norm_ptr + d).to(tl.float32), xp * r * tl.load(norm_ptr + partner).to(tl.float32)
    return x * cos + sign * xp * sin


@triton.jit
def _attend_kernel(qkv_ptr, k_ptr, v_ptr, inv_freq_ptr, pos_ptr, qn_ptr, kn_ptr, out_ptr, part_ptr, count_ptr, C,
                   eps, scale, rope_sign, rope_scale, NH: tl.constexpr, NKV: tl.constexpr, HD: tl.constexpr,
                   QK_NORM: tl.constexpr, GDC: tl.constexpr, BLOCK_S: tl.constexpr, MAX_SPLITS,
                   COMBINE_BLOCK: tl.constexpr):
    # program (h, j): query head h over cache slots [j BLOCK_S, (j + 1) BLOCK_S) ∩ [0, pos); split 0 also takes the
    # new token's own key/value. Each writes its partial softmax (max, sum, weighted values) to part_ptr; the last
    # to finish (a counter per head) merges them. One pass of loads per program however long the context is: a
    # loop over the slots in one program costs a round of memory latency per block.
    h = tl.program_id(0)
    j = tl.program_id(1)
    kvh = h // (NH // NKV)
    if GDC:  # q/k/v come from the kernel before; nothing worth reading before them
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pos = tl.load(pos_ptr)
    n_splits = tl.maximum(tl.cdiv(pos, BLOCK_S), 1)
    if j < n_splits:
        d = tl.arange(0, HD)
        partner = (d + HD // 2) % HD  # rotate_half(x)[d] = -x[d + hd/2] for the first half, x[d - hd/2] after
        sign = tl.where(d < HD // 2, -1.0, 1.0)
        angle = pos.to(tl.float32) * tl.load(inv_freq_ptr + d % (HD // 2))  # fp32, as the reference computes it
        cos = tl.cos(angle) * rope_scale  # rope_scale: yarn's attention factor on cos and sin (else 1)
        sin = tl.sin(angle) * rope_scale * rope_sign
        q = _rotated_head(qkv_ptr + h * HD, qn_ptr, d, partner, sign, cos, sin, eps, HD, QK_NORM)
        cache_k = k_ptr + kvh * C * HD
        cache_v = v_ptr + kvh * C * HD
        s = j * BLOCK_S + tl.arange(0, BLOCK_S)
        ok = s < pos
        keys = tl.load(cache_k + s[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        vals = tl.load(cache_v + s[:, None] * HD + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        scores = tl.where(ok, tl.sum(keys * q[None, :], axis=1) * scale, float("-inf"))
        if j == 0:  # the new token: rotate its key, write it and its value to slot `pos`, attend to it
            k = _rotated_head(qkv_ptr + NH * HD + kvh * HD, kn_ptr, d, partner, sign, cos, sin, eps, HD, QK_NORM)
            v = tl.load(qkv_ptr + (NH + NKV) * HD + kvh * HD + d).to(tl.float32)
            if h % (NH // NKV) == 0:  # one program per kv head writes the slot; the others read only earlier ones
                tl.store(cache_k + pos * HD + d, k.to(k_ptr.dtype.element_ty))
                tl.store(cache_v + pos * HD + d, v.to(v_ptr.dtype.element_ty))
            own = tl.sum(q * k, axis=0) * scale
            m = tl.maximum(own, tl.max(scores, axis=0))
            p = tl.exp(scores - m)
            w_own = tl.exp(own - m)
            l_sum = tl.sum(p, axis=0) + w_own
            acc = tl.sum(p[:, None] * vals, axis=0) + w_own * v
        else:  # a non-empty block of earlier slots: its maximum is finite
            m = tl.max(scores, axis=0)
            p = tl.exp(scores - m)
            l_sum = tl.sum(p, axis=0)
            acc = tl.sum(p[:, None] * vals, axis=0)
        if n_splits == 1:
            tl.store(out_ptr + h * HD + d, (acc / l_sum).to(out_ptr.dtype.element_ty))
        else:
            # partials, float32: weighted values [NH, MAX_SPLITS, HD], then (max, sum) [NH, MAX_SPLITS, 2]
            stats = part_ptr + NH * MAX_SPLITS * HD + h * MAX_SPLITS * 2
            tl.store(part_ptr + (h * MAX_SPLITS + j) * HD + d, acc)
            tl.store(stats + 2 * j, m)
            tl.store(stats + 2 * j + 1, l_sum)
            # every thread's stores before the counter; its release makes them visible to the program that takes
            # the last count (acquire), which reads them past L1 (.cg)
            tl.debug_barrier()
            done = tl.atomic_add(count_ptr + h, 1, sem="acq_rel", scope="gpu")
            if done == n_splits - 1:
                m_all = tl.full([COMBINE_BLOCK], float("-inf"), tl.float32)
                for c0 in range(0, n_splits, COMBINE_BLOCK):
                    c = c0 + tl.arange(0, COMBINE_BLOCK)
                    m_all = tl.maximum(m_all, tl.load(stats + 2 * c, mask=c < n_splits,
                                                      other=float("-inf"), cache_modifier=".cg"))
                m_max = tl.max(m_all, axis=0)
                total = tl.zeros([HD], tl.float32)
                l_total = m_max * 0.0
                for c0 in range(0, n_splits, COMBINE_BLOCK):
                    c = c0 + tl.arange(0, COMBINE_BLOCK)
                    c_ok = c < n_splits
                    scale_c = tl.exp(tl.load(stats + 2 * c, mask=c_ok, other=float("-inf"),
                                             cache_modifier=".cg") - m_max)
                    l_total += tl.sum(scale_c * tl.load(stats + 2 * c + 1, mask=c_ok, other=0.0,
                                                        cache_modifier=".cg"), axis=0)
                    part = tl.load(part_ptr + (h * MAX_SPLITS + c[:, None]) * HD + d[None, :], mask=c_ok[:, None],
                                   other=0.0, cache_modifier=".cg")
                    total += tl.sum(scale_c[:, None] * part, axis=0)
                tl.store(out_ptr + h * HD + d, (total / l_total).to(out_ptr.dtype.element_ty))
                tl.store(count_ptr + h, 0)  # ready for the next call


def attend_scratch(num_heads: int, head_dim: int, capacity: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """What `attend` needs besides its inputs for a cache of `capacity` slots: the per-program partials and the
    per-head counters (zero; every call leaves them zero). Calls run one after another can share it."""
    splits = triton.cdiv(capacity, ATTEND_SPLIT)
    return (torch.empty(num_heads * splits * (head_dim + 2), dtype=torch.float32, device=device),  # see the kernel
            torch.zeros(num_heads, dtype=torch.int32, device=device))


def attend(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, inv_freq: torch.Tensor, rope_sign: int,
           pos: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int, q_norm: torch.Tensor | None = None,
           k_norm: torch.Tensor | None = None, eps: float = 0.0,
           scratch: tuple[torch.Tensor, torch.Tensor] | None = None, rope_scale: float = 1.0) -> torch.Tensor:
    """One token's attention: qkv [(nh + 2 nkv) hd] -> [nh hd]; k/v_cache [1, nkv, C, hd] (slot `pos` written);
    inv_freq [hd/2] float32 (RoPE angle = pos * inv_freq, sin negated for rope_sign -1, cos and sin multiplied by
    rope_scale: yarn's attention factor); pos [1] int64; scratch from `attend_scratch` (made here when not
    given)."""
    out = torch.empty(num_heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    capacity = k_cache.shape[2]
    parts, counts = scratch if scratch is not None else attend_scratch(num_heads, head_dim, capacity, qkv.device)
    splits = triton.cdiv(capacity, ATTEND_SPLIT)
    qk = q_norm is not None
    _attend_kernel[(num_heads, splits)](qkv, k_cache, v_cache, inv_freq, pos, q_norm if qk else inv_freq,
                                        k_norm if qk else inv_freq, out, parts, counts, capacity, float(eps),
                                        head_dim ** -0.5, float(rope_sign), float(rope_scale), NH=num_heads,
                                        NKV=num_kv_heads, HD=head_dim, QK_NORM=qk, GDC=_pdl(), BLOCK_S=ATTEND_SPLIT, MAX_SPLITS=splits,
                                        COMBINE_BLOCK=min(32, triton.next_power_of_2(splits)), num_warps=4,
                                        launch_pdl=_pdl())
    return out


@triton.jit
def _greedy_advance_kernel(logits_ptr, token_ptr, pos_ptr, generated_ptr, V, GDC: tl.constexpr,
                           BLOCK: tl.constexpr):
    if GDC:
        tl.extra.cuda.gdc_wait()
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
    _greedy_advance_kernel[(1,)](logits, token, pos, generated, logits.numel(), GDC=_pdl(), BLOCK=4096,
                                 num_warps=8, launch_pdl=_pdl())

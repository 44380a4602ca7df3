"""llama.cpp's block grids as fixed quantization grids: solve a tensor's block scales (and mins) once, then any
rounding -- round-to-nearest, or GPTQ's error-compensating column updates -- picks codes on that grid, and the codes
pack into the exact bytes llama.cpp reads (checked against gguf-py's dequantization in tests/test_ggml_grid.py).

Every type is `w = offset + scale * code`, code in [0, maxq], per sub-block of `sub` weights along a row:
- Q4_0 / Q5_0 (32): scale d (fp16), code = q, offset = -8d / -16d;  Q8_0 (32): d·(code - 128), int8 storage;
- Q4_1 / Q5_1 (32): scale d, offset m (both fp16);
- Q4_K / Q5_K (super-block 256 = 8 × 32): scale = d·sc, offset = -dmin·m with d, dmin fp16 and sc, m 6-bit;
- Q6_K (super-block 256 = 16 × 16): scale = d·sc with sc int8, offset = -32·scale.

Scales are chosen as llama.cpp chooses them when given an importance matrix (llama.cpp's imatrix: per input column,
the mean squared activation): each sub-block's scale (and min) minimises Σ qw·√(σ² + x²)·(x - x̂)² over a small
search of candidate scales, the K-quants' sub-block scales are then rounded to their 6/8-bit codes relative to the
super-block's fp16 scale. The grid is fixed before any code is chosen, so GPTQ can run against it (quant/gptq.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

QK_K = 256
# type -> (sub-block width, maxq, super-block width)
GEOMETRY = {"Q4_0": (32, 15, 32), "Q5_0": (32, 31, 32), "Q8_0": (32, 255, 32), "Q4_1": (32, 15, 32),
            "Q5_1": (32, 31, 32), "Q4_K": (32, 15, QK_K), "Q5_K": (32, 31, QK_K), "Q6_K": (16, 63, QK_K)}
SYMMETRIC = {"Q4_0": 8, "Q5_0": 16, "Q8_0": 128, "Q6_K": 32}  # code offset of the symmetric types
TYPES = tuple(GEOMETRY)


@dataclass
class BlockGrid:
    """One tensor's fixed grid: w = offset + scale * code per (row, sub-block)."""
    qtype: str
    scale: torch.Tensor  # [rows, n_sub] float32: exactly the values llama.cpp computes from the stored fields
    offset: torch.Tensor  # [rows, n_sub]
    stored: dict[str, torch.Tensor]  # the fields as stored: fp16 d/dmin/m, integer sc/mins

    @property
    def sub(self) -> int:
        return GEOMETRY[self.qtype][0]

    @property
    def maxq(self) -> int:
        return GEOMETRY[self.qtype][1]

    def _sub_blocks(self, cols: slice | None, width: int, device) -> torch.Tensor:
        """The sub-block of each of `width` columns starting at cols.start (at 0 when cols is None)."""
        start = 0 if cols is None else cols.start
        return torch.arange(start, start + width, device=device) // self.sub

    def codes(self, w: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
        """Round-to-nearest codes of w [rows, k] (the columns `cols` of the tensor; all when None)."""
        g = self._sub_blocks(cols, w.shape[1], w.device)
        scale, offset = self.scale[:, g], self.offset[:, g]
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.round((w.float() - offset) / safe).clamp(0, self.maxq)
        return torch.where(scale == 0, torch.zeros_like(q), q)

    def resolve(self, start: int, weight: torch.Tensor, importance: torch.Tensor | None) -> None:
        """Solve again the super-block of columns [start, start + its width) from `weight` (those columns' current
        values: GPTQ's error-updated weights when that super-block comes up)."""
        sup = GEOMETRY[self.qtype][2]
        new = solve(weight, self.qtype, importance)
        k, s0 = start // sup, start // self.sub
        self.scale[:, s0:s0 + sup // self.sub] = new.scale
        self.offset[:, s0:s0 + sup // self.sub] = new.offset
        for name, value in new.stored.items():
            self.stored[name][:, k:k + 1] = value

    def values(self, codes: torch.Tensor, cols: slice | None = None) -> torch.Tensor:
        g = self._sub_blocks(cols, codes.shape[1], codes.device)
        return self.offset[:, g] + self.scale[:, g] * codes


def _f16(x: torch.Tensor) -> torch.Tensor:
    return x.half().float()


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """llama.cpp's per-weight error weights with an imatrix: qw · √(σ² + x²), σ² the block's mean square."""
    sigma2 = (x * x).mean(dim=-1, keepdim=True)
    qw = torch.ones_like(x) if importance is None else importance.expand_as(x)
    return qw * torch.sqrt(sigma2 + x * x)


def _search_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 9) -> torch.Tensor:
    """Per block (rows of x [B, n]): the scale d (signed, as llama.cpp's: the largest-magnitude weight maps to
    -nmax) minimising Σ w (x - d·L)² with L = clamp(round(x / d), -nmax, nmax - 1), over candidates around it."""
    amax_i = x.abs().argmax(dim=-1, keepdim=True)
    vmax = torch.gather(x, -1, amax_i)  # signed
    best_d = torch.zeros_like(vmax)
    best_err = torch.full_like(vmax, float("inf"))
    safe = torch.where(vmax == 0, torch.ones_like(vmax), vmax)
    for k in range(-steps, steps + 1):
        iscale = -(nmax + 0.1 * k) / safe
        L = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        sumlx, suml2 = (w * x * L).sum(-1, keepdim=True), (w * L * L).sum(-1, keepdim=True)
        d = torch.where(suml2 > 0, sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
        err = (w * (x - d * L) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best_d, best_err = torch.where(better, d, best_d), torch.where(better, err, best_err)
    return torch.where(vmax == 0, torch.zeros_like(best_d), best_d)[..., 0]


def _search_asymmetric(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float = -1.0, rdelta: float = 0.1,
                       steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: (scale, min) with min ≤ 0 minimising Σ w (x - (min + scale·L))², L in [0, nmax] -- llama.cpp's
    make_qkx2 search: candidate inverse scales over (max - min), each refitted by weighted least squares; as there,
    an accepted candidate's min becomes the origin of the next candidates."""
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)
    xmax = x.amax(dim=-1, keepdim=True)
    flat = xmax == xmin
    span = torch.where(flat, torch.ones_like(xmax), xmax - xmin)
    best_s, best_m = 1 / (nmax / span), xmin
    L0 = torch.round(nmax / span * (x - xmin)).clamp(0, nmax)
    best_err = (w * (best_s * L0 + xmin - x) ** 2).sum(-1, keepdim=True)
    sw, swx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)
    for k in range(steps + 1):
        iscale = (rmin + rdelta * k + nmax) / torch.where(flat, torch.ones_like(xmax), xmax - best_m)
        L = torch.round(iscale * (x - best_m)).clamp(0, nmax)
        swl, swl2, swlx = (w * L).sum(-1, keepdim=True), (w * L * L).sum(-1, keepdim=True), \
            (w * L * x).sum(-1, keepdim=True)
        det = sw * swl2 - swl * swl
        ok = det > 0
        safe_det = torch.where(ok, det, torch.ones_like(det))
        s = (sw * swlx - swx * swl) / safe_det
        m = (swl2 * swx - swl * swlx) / safe_det
        pos = m > 0  # min above zero: fix it at zero and refit the scale
        s = torch.where(pos, swlx / swl2.clamp(min=1e-30), s)
        m = torch.where(pos, torch.zeros_like(m), m)
        err = (w * (s * L + m - x) ** 2).sum(-1, keepdim=True)
        better = ok & (err < best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
        best_err = torch.where(better, err, best_err)
    best_s = torch.where(flat, torch.zeros_like(best_s), best_s)
    return best_s[..., 0], best_m[..., 0]


def solve(weight: torch.Tensor, qtype: str, importance: torch.Tensor | None = None) -> BlockGrid:
    """The grid of `weight` [rows, in] for `qtype`; `importance` [in]: per-column activation energy (or None)."""
    sub, maxq, sup = GEOMETRY[qtype]
    rows, cols = weight.shape
    if cols % sup:
        raise ValueError(f"{qtype} needs rows of a multiple of {sup} weights, not {cols}")
    x = weight.float().reshape(rows, cols // sub, sub)
    imp = None if importance is None else importance.float().clamp(min=0).reshape(1, cols // sub, sub)
    if imp is not None:  # a column no calibration token reached still counts a little
        imp = imp + 1e-6 * imp.mean().clamp(min=1e-30)
    w = _weights(x, imp)
    if qtype in ("Q4_0", "Q5_0", "Q8_0"):
        nmax = SYMMETRIC[qtype]
        d = _f16(_search_symmetric(x, w, nmax))  # Q8_0: codes 0..255 are the int8 values + 128
        return BlockGrid(qtype, d, -SYMMETRIC[qtype] * d, {"d": d})
    if qtype in ("Q4_1", "Q5_1"):
        s, m = _search_asymmetric(x, w, maxq)
        d, m16 = _f16(s), _f16(m)
        return BlockGrid(qtype, d, m16, {"d": d, "m": m16})
    if qtype in ("Q4_K", "Q5_K"):
        s, m = _search_asymmetric(x, w, maxq)
        mins = -m  # ≥ 0
        per = QK_K // sub
        s, mins = s.reshape(rows, -1, per), mins.reshape(rows, -1, per)
        smax, mmax = s.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
        d, dmin = _f16(smax / 63), _f16(mmax / 63)
        # as llama.cpp: the 6-bit codes against the unrounded maxima
        sc = torch.round(s * torch.where(smax > 0, 63 / smax, torch.zeros_like(smax))).clamp(0, 63)
        mq = torch.round(mins * torch.where(mmax > 0, 63 / mmax, torch.zeros_like(mmax))).clamp(0, 63)
        scale, offset = (d * sc).reshape(rows, -1), (-(dmin * mq)).reshape(rows, -1)
        return BlockGrid(qtype, scale, offset, {"d": d[..., 0], "dmin": dmin[..., 0], "sc": sc, "m": mq})
    # Q6_K: signed sub-block scales as int8 against one fp16 scale per super-block
    s = _search_symmetric(x, w, 32).reshape(rows, -1, QK_K // sub)
    imax = s.abs().argmax(-1, keepdim=True)
    smax = torch.gather(s, -1, imax)
    iscale = torch.where(smax == 0, torch.zeros_like(smax), -128 / torch.where(smax == 0, torch.ones_like(smax), smax))
    sc = torch.round(iscale * s).clamp(-128, 127)
    d = _f16(torch.where(iscale == 0, torch.zeros_like(iscale), 1 / torch.where(iscale == 0, torch.ones_like(iscale),
                                                                                 iscale)))
    scale = (d * sc).reshape(rows, -1)
    return BlockGrid(qtype, scale, -32 * scale, {"d": d[..., 0], "sc": sc})


# ---- packing: codes [rows, in] on a grid -> the bytes of llama.cpp's blocks [rows, bytes per row] ----

def _nibbles(q: np.ndarray) -> np.ndarray:
    """[..., 32] codes 0..15 -> [..., 16] bytes: element j low nibble, j + 16 high (Q4_0/Q4_1/Q5_0/Q5_1)."""
    return (q[..., :16] & 0x0F) | ((q[..., 16:] & 0x0F) << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """[..., 32] 5-bit codes -> [..., 4] bytes: bit 4 of element j at bit j of a little-endian uint32."""
    return np.packbits((q >> 4) & 1, axis=-1, bitorder="little")


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    return x.cpu().numpy().astype(np.float16)[..., None].view(np.uint8)


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 6-bit scales and 8 6-bit mins [..., 8] -> the 12 packed bytes of Q4_K/Q5_K (llama.cpp's get_scale_min_k4)."""
    out = np.zeros((*sc.shape[:-1], 12), np.uint8)
    out[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    out[..., 4:8] = (m[..., 0:4] & 63) | ((m[..., 4:8] >> 4) << 6)
    out[..., 8:12] = (sc[..., 4:8] & 0x0F) | ((m[..., 4:8] & 0x0F) << 4)
    return out


def pack(grid: BlockGrid, codes: torch.Tensor) -> np.ndarray:
    """The bytes llama.cpp stores for `codes` [rows, in] on `grid`: uint8 [rows, in / block · block bytes]."""
    rows, cols = codes.shape
    q = codes.cpu().numpy().astype(np.int64)
    t = grid.qtype
    st = grid.stored
    if t in ("Q4_0", "Q5_0", "Q4_1", "Q5_1", "Q8_0"):
        qb = q.reshape(rows, cols // 32, 32)
        d = _f16_bytes(st["d"])
        if t == "Q8_0":
            parts = [d, (qb - 128).astype(np.int8).view(np.uint8)]
        else:
            qb = qb.astype(np.uint8)
            head = [d, _f16_bytes(st["m"])] if t in ("Q4_1", "Q5_1") else [d]
            high = [_high_bits(qb)] if t in ("Q5_0", "Q5_1") else []
            parts = [*head, *high, _nibbles(qb)]
        return np.concatenate(parts, axis=-1).reshape(rows, -1)
    nsup = cols // QK_K
    qb = q.reshape(rows, nsup, QK_K).astype(np.uint8)
    d = _f16_bytes(st["d"])
    if t in ("Q4_K", "Q5_K"):
        scales = _k_scales(st["sc"].cpu().numpy().astype(np.uint8), st["m"].cpu().numpy().astype(np.uint8))
        # 4 chunks of 64: bytes hold element l of the chunk's first 32 (low nibble) and of its second 32 (high)
        chunks = qb.reshape(rows, nsup, 4, 2, 32)
        qs = ((chunks[:, :, :, 0] & 0x0F) | ((chunks[:, :, :, 1] & 0x0F) << 4)).reshape(rows, nsup, 128)
        parts = [d, _f16_bytes(st["dmin"]), scales]
        if t == "Q5_K":  # bit 4 of element 32j + l at bit j of qh[l]
            hb = ((qb.reshape(rows, nsup, 8, 32) >> 4) & 1).astype(np.uint8)
            qh = (hb << np.arange(8, dtype=np.uint8)[None, None, :, None]).sum(axis=2).astype(np.uint8)
            parts.append(qh)
        parts.append(qs)
        return np.concatenate(parts, axis=-1).reshape(rows, -1)
    # Q6_K: two halves of 128; in each, ql[l] (l < 64) holds elements l (low) and l + 64 (high) of the low 4 bits
    # of the half's first and third 32s ... as llama.cpp's dequantize_row_q6_K reads them
    halves = qb.reshape(rows, nsup, 2, 4, 32)  # [.., half, quarter, l]
    low, high = halves & 0x0F, halves >> 4
    ql = np.concatenate([low[:, :, :, 0] | (low[:, :, :, 2] << 4), low[:, :, :, 1] | (low[:, :, :, 3] << 4)],
                        axis=-1)  # [.., half, 64]
    qh = (high[:, :, :, 0] | (high[:, :, :, 1] << 2) | (high[:, :, :, 2] << 4) | (high[:, :, :, 3] << 6))
    sc = st["sc"].cpu().numpy().astype(np.int8).view(np.uint8)
    return np.concatenate([ql.reshape(rows, nsup, 128).astype(np.uint8), qh.reshape(rows, nsup, 64).astype(np.uint8),
                           sc, d], axis=-1).reshape(rows, -1)


def ggml_type(qtype: str):
    import gguf

    return gguf.GGMLQuantizationType[qtype]


def dequantize_blocks(blocks: np.ndarray, qtype: str, shape: tuple[int, int]) -> torch.Tensor:
    """gguf-py's dequantization of stored blocks (the reader's view of the file) as float32 [rows, in]: what the
    checkpoint loader computes (toolkit/core/quantized.py)."""
    from toolkit.core.quantized import ggml_dequantize

    return ggml_dequantize(blocks, qtype, shape)

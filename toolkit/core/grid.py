"""Integer grids for weight quantization: per output row and per group of `group_size` input columns.

`w ≈ scale * (q - zero)`, q in [0, 2^bits - 1]. Scales are rounded to fp16 before the codes are computed, because
fp16 is how they are stored (GPTQ checkpoints, GGUF Q4_0): the codes are then exact for the stored scales.
- symmetric (as GPTQ's reference code): zero = 2^(bits-1) (8 for 4 bits), scale = 2·max|w| / (2^bits - 1), so the
  grid spans [-8, 7]·scale for 4 bits.
- asymmetric: the grid spans [min(w, 0), max(w, 0)]; zero = round(-min / scale), kept ≥ 1 because the GPTQ-v1
  checkpoint format stores zero - 1 in an unsigned nibble.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Grid:
    bits: int = 4
    group_size: int = 128  # -1: one group per row
    sym: bool = True

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def params(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) per row of w [rows, cols] over all its columns: float32 scale (fp16-representable), int zero."""
    w = w.float()
    if grid.sym:
        xmax = w.abs().amax(dim=1)
        scale = 2 * xmax / grid.maxq
        zero = torch.full_like(scale, (grid.maxq + 1) // 2)
    else:
        xmin = w.amin(dim=1).clamp(max=0)
        xmax = w.amax(dim=1).clamp(min=0)
        scale = (xmax - xmin) / grid.maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row: any scale, codes = zero
    scale = scale.half().float()
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 2.0 ** -24))  # fp16 underflow guard
    if not grid.sym:
        zero = torch.round(-xmin / scale).clamp(1, grid.maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Codes of w [rows, cols] for per-row scale/zero [rows] (or [rows, 1])."""
    scale, zero = scale.reshape(-1, 1), zero.reshape(-1, 1)
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, 1) * (q - zero.reshape(-1, 1))


def rtn(w: torch.Tensor, grid: Grid) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: codes [out, in], scales [groups, out], zeros [groups, out]."""
    out_f, in_f = w.shape
    width, n = grid.width(in_f), grid.groups(in_f)
    codes = torch.empty(out_f, in_f)
    scales, zeros = torch.empty(n, out_f), torch.empty(n, out_f)
    for g in range(n):
        cols = slice(g * width, (g + 1) * width)
        scales[g], zeros[g] = params(w[:, cols], grid)
        codes[:, cols] = quantize(w[:, cols], scales[g], zeros[g], grid.maxq)
    return codes, scales, zeros


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor):
    """Weights [out, in] from codes [out, in] and per-group scales/zeros [groups, out] (g_idx: group of each
    input column)."""
    g_idx = g_idx.long()
    return scales.float().T[:, g_idx] * (codes.float() - zeros.float().T[:, g_idx])

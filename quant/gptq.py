"""GPTQ (Frantar et al., 2022) for one linear layer, written from the paper's algorithm.

Given W [out, in] and the Hessian H = 2/N Σ x xᵀ of the layer's calibration inputs, quantize the columns one at a
time and spread each column's rounding error over the columns not yet quantized, weighted by the inverse Hessian:
- dead inputs (H[d, d] = 0) get H[d, d] = 1 and W[:, d] = 0;
- dampening: damp · mean(diag H) added to the diagonal; if the Cholesky factorisation fails, the dampening is
  raised (×10 up to 1.0 of the mean diagonal) and the retry is reported;
- the upper Cholesky factor of H⁻¹ gives the per-column update rows;
- lazy batch updates over blocks of 128 columns;
- groups: scale/zero per `group_size` input columns, taken from the error-updated weights when the group's first
  column comes up (as the reference code does; groups never straddle a 128-column block). With act-order (columns in
  order of decreasing H[d, d]) the groups are static: their scale/zero come from the original weights in the
  original column order, so g_idx stays i // group_size and kernels need no reordering.
Rows are independent (each row's error spreads only along that row), so layers sharing an input (q/k/v, gate/up)
are solved as one stacked matrix.

`gptq_on_grid` runs the same column loop against llama.cpp's block grids (toolkit/core/ggml_grid.py), so the codes
are a GGUF type's own (Q4_K super-blocks with 6-bit sub-block scales, Q6_K, Q5_0, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit.core.grid import Grid, params, quantize

BLOCK = 128


@dataclass
class GPTQResult:
    codes: torch.Tensor  # [out, in] float holding integers
    scales: torch.Tensor  # [groups, out]
    zeros: torch.Tensor  # [groups, out]
    damp: float  # the dampening that factorised
    retries: int


class Hessian:
    """Running H = 2/N Σ x xᵀ over calibration rows x [*, in]."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        self.H *= self.n / (self.n + m)
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H += x.T @ x


def _inverse_factor(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float, int]:
    mean_diag = torch.mean(torch.diag(H)).item()
    retries = 0
    while True:
        Hd = H.clone()
        Hd.diagonal().add_(damp * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            inv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0 and torch.isfinite(U).all():
                return U, damp, retries
        if damp >= 1.0:
            raise FloatingPointError("the Hessian is not positive definite even with dampening 1.0")
        damp, retries = min(1.0, damp * 10), retries + 1


def _solve_columns(W: torch.Tensor, H: torch.Tensor, damp: float, act_order: bool, column,
                   block: int = BLOCK) -> tuple:
    """GPTQ's column loop (dead inputs, dampening, act-order, lazy 128-column blocks). `column(j, w, W1, i)` rounds
    column j of the original order (w: its current values, W1[:, i] the same column inside the block being
    solved) and returns (codes, rounded values)."""
    W = W.float().clone()
    H = H.float().clone()
    in_f = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    U, used_damp, retries = _inverse_factor(H, damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], U1[i, i]
            q, rounded = column(int(perm[i1 + i]), w, W1, i)
            Q1[:, i] = q
            err = (w - rounded) / d
            W1[:, i:] -= err[:, None] @ U1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)], used_damp, retries


def gptq(W: torch.Tensor, H: torch.Tensor, grid: Grid, damp: float = 0.01, act_order: bool = False) -> GPTQResult:
    out_f, in_f = W.shape
    width, n_groups = grid.width(in_f), grid.groups(in_f)
    scales, zeros = torch.empty(n_groups, out_f, device=W.device), torch.empty(n_groups, out_f, device=W.device)
    static = act_order or grid.group_size == -1
    if static:  # parameters from the original weights (dead inputs zeroed), in the original column order
        W0 = torch.where(torch.diag(H) == 0, torch.zeros_like(W), W.float())
        for g in range(n_groups):
            scales[g], zeros[g] = params(W0[:, g * width:(g + 1) * width], grid)

    def column(j, w, W1, i):
        g = j // width if grid.group_size != -1 else 0
        if not static and j % width == 0:  # width divides BLOCK: the group lies inside this block
            scales[g], zeros[g] = params(W1[:, i:i + width], grid)
        q = quantize(w[:, None], scales[g], zeros[g], grid.maxq)[:, 0]
        return q, scales[g] * (q - zeros[g])

    Q, used_damp, retries = _solve_columns(W, H, damp, act_order, column)
    return GPTQResult(Q, scales, zeros, used_damp, retries)


def gptq_on_grid(W: torch.Tensor, H: torch.Tensor, grid, damp: float = 0.01,
                 act_order: bool = False) -> tuple[torch.Tensor, float, int]:
    """GPTQ against llama.cpp's block grids (toolkit/core/ggml_grid.py: Q4_K, Q6_K, Q5_0, ...): (codes [out, in],
    dampening used, retries). `grid` holds the scales solved from the original weights; without act-order each
    super-block's scales are solved again from the error-updated weights when its first column comes up (as GPTQ's
    groups), with act-order they stay as given (static). The importance is the Hessian's diagonal."""
    from toolkit.core.ggml_grid import GEOMETRY

    sup = GEOMETRY[grid.qtype][2]
    importance = torch.diag(H)

    def column(j, w, W1, i):
        if not act_order and j % sup == 0:  # the super-block lies inside this block (BLOCK is a multiple)
            grid.resolve(j, W1[:, i:i + sup], importance[j:j + sup])
        q = grid.codes(w[:, None], slice(j, j + 1))
        return q[:, 0], grid.values(q, slice(j, j + 1))[:, 0]

    return _solve_columns(W, H, damp, act_order, column, block=max(BLOCK, sup))


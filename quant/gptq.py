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


def gptq(W: torch.Tensor, H: torch.Tensor, grid: Grid, damp: float = 0.01, act_order: bool = False) -> GPTQResult:
    W = W.float().clone()
    H = H.float().clone()
    out_f, in_f = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    width, n_groups = grid.width(in_f), grid.groups(in_f)
    scales, zeros = torch.empty(n_groups, out_f, device=W.device), torch.empty(n_groups, out_f, device=W.device)
    static = act_order or grid.group_size == -1
    if static:  # parameters from the original weights, in the original column order
        for g in range(n_groups):
            scales[g], zeros[g] = params(W[:, g * width:(g + 1) * width], grid)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(in_f, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // width) if grid.group_size != -1 else torch.zeros_like(perm)
    U, used_damp, retries = _inverse_factor(H, damp)
    Q = torch.zeros_like(W)
    for i1 in range(0, in_f, BLOCK):
        i2 = min(i1 + BLOCK, in_f)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w, d = W1[:, i], U1[i, i]
            g = group_of[i1 + i]
            if not static and (i1 + i) % width == 0:  # width divides BLOCK: the group lies inside this block
                scales[g], zeros[g] = params(W1[:, i:i + width], grid)
            q = quantize(w[:, None], scales[g], zeros[g], grid.maxq)[:, 0]
            Q1[:, i] = q
            err = (w - scales[g] * (q - zeros[g])) / d
            W1[:, i:] -= err[:, None] @ U1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inverse = torch.argsort(perm)
    return GPTQResult(Q[:, inverse], scales, zeros, used_damp, retries)

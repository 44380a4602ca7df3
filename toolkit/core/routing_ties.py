"""Reference logits for an engine whose MoE routers run at lower precision than the reference model.

A token whose k-th and (k+1)-th router logits lie closer than the engine's error can go to either expert: both are
correct computations of the model at that precision, yet they give logits that differ by far more than the type's
tolerance (measured: 5 of 12 random-weight qwen3moe q8_0 files failed verification on gaps of 0.0015-0.02 router
logits, with |dlogit| up to 1.8). Comparing against the reference's own choice would reject good files.

So the reference follows the engine's choice at those near-ties only, decided token by token from left to right:
for the earliest token with a near-tie, the reference is run with each combination of swaps (k-th expert ->
(k+1)-th) over that token's near-tied layers, and the combination whose logits at that token come closest to the
engine's is kept. A token's logits depend on no later token, so earlier decisions stand. Swaps happen only where
the gap is below `gap`; everything else about the comparison is unchanged, so a file with wrong weights or layout
still fails.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

MAX_LAYERS_PER_TOKEN = 4  # near-ties at more layers of one token: the 4 smallest gaps are tried (16 runs)
MAX_RUNS = 256  # reference runs in all; past it the remaining near-ties keep the reference's own routes


def _moe_layers(model) -> list:
    from toolkit.core.model import MoE

    return [m for m in model.modules() if isinstance(m, MoE)]


def _run(model, layers: list, ids: list[int], swaps: set[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Logits [T, V] and router gaps [layers, T] with the reference routed as `swaps` ((layer, token) pairs) say."""
    for i, layer in enumerate(layers):
        layer.record_gaps = True
        layer.swap = {t for li, t in swaps if li == i}
    try:
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0].float().numpy()
        gaps = np.stack([layer.gaps.numpy() for layer in layers])
    finally:
        for layer in layers:
            layer.record_gaps, layer.swap, layer.gaps = False, set(), None
    return logits, gaps


def reference_logits(model, ids: list[int], engine: np.ndarray, gap: float) -> tuple[np.ndarray, int]:
    """The reference's logits [T, V] for `ids` with near-tied routing (router-logit gap < `gap`) decided as the
    engine's logits `engine` [T, V] show; and how many (layer, token) choices were swapped. Dense models: one
    plain run."""
    layers = _moe_layers(model)
    if not layers:
        with torch.no_grad():
            return model(torch.tensor([ids]))[0].float().numpy(), 0
    swaps: set[tuple[int, int]] = set()
    logits, gaps = _run(model, layers, ids, swaps)
    runs, token = 1, 0
    while True:
        near = np.argwhere(gaps[:, token:] < gap)
        if not len(near) or runs >= MAX_RUNS:
            return logits, len(swaps)
        token = token + int(near[:, 1].min())
        tied = sorted(np.flatnonzero(gaps[:, token] < gap), key=lambda li: gaps[li, token])[:MAX_LAYERS_PER_TOKEN]
        best = (float(np.abs(logits[token] - engine[token]).max()), (), logits, gaps)
        for n in range(1, len(tied) + 1):
            for combo in itertools.combinations(tied, n):
                trial = swaps | {(int(li), token) for li in combo}
                t_logits, t_gaps = _run(model, layers, ids, trial)
                runs += 1
                diff = float(np.abs(t_logits[token] - engine[token]).max())
                if diff < best[0]:
                    best = (diff, combo, t_logits, t_gaps)
        swaps |= {(int(li), token) for li in best[1]}
        logits, gaps = best[2], best[3]
        token += 1

"""Perplexity as llama-perplexity computes it, for training's held-out check and the parity harness.

Tokens are cut into non-overlapping chunks of `ctx`; when the tokenizer adds BOS, each chunk's first token is replaced
by BOS (llama-perplexity's rule); only the second half of each chunk is scored: positions ctx/2 .. ctx-2 predicting
the next token. PPL = exp(mean NLL); its error is propagated from the NLL's standard error, as llama-perplexity does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from toolkit.core.errors import ToolkitError


@dataclass
class PerplexityResult:
    ppl: float
    ppl_err: float
    nll_mean: float
    n_tokens: int
    n_scored: int
    ctx: int
    nll: np.ndarray  # per scored position, chunk-major


def chunks(tokens: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    if ctx < 4 or ctx % 2:
        raise ToolkitError(f"context {ctx} must be an even number of at least 4", "use --ctx 256 or 512")
    n = len(tokens) // ctx
    if n < 1:
        raise ToolkitError(f"text has {len(tokens)} tokens, fewer than one chunk of {ctx}",
                           "give a longer text or a smaller --ctx")
    out = []
    for i in range(n):
        chunk = list(tokens[i * ctx:(i + 1) * ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def scored_positions(ctx: int) -> slice:
    """Logit rows scored in a chunk: ctx/2 .. ctx-2, each predicting the token after it."""
    return slice(ctx // 2, ctx - 1)


def nll_from_logits(logits: np.ndarray, chunk: list[int]) -> np.ndarray:
    """NLL of the scored positions from one chunk's logits [ctx, vocab] (float64 log-softmax)."""
    ctx = len(chunk)
    rows = logits[scored_positions(ctx)].astype(np.float64)
    targets = np.asarray(chunk[ctx // 2 + 1:ctx])
    m = rows.max(axis=-1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(rows - m).sum(axis=-1))
    return logz - rows[np.arange(len(targets)), targets]


def summarize(nll: np.ndarray, n_tokens: int, ctx: int) -> PerplexityResult:
    mean = float(nll.mean())
    ppl = math.exp(mean)
    err = float(nll.std(ddof=1) / math.sqrt(len(nll))) if len(nll) > 1 else 0.0
    return PerplexityResult(ppl, ppl * err, mean, n_tokens, len(nll), ctx, nll)


def perplexity(logits_fn: Callable[[list[list[int]]], np.ndarray], tokens: list[int], ctx: int,
               bos: int | None = None, batch_size: int = 1) -> PerplexityResult:
    """logits_fn(chunks) -> float logits [n_chunks, ctx, vocab], each chunk from a fresh context."""
    all_chunks = chunks(tokens, ctx, bos)
    parts = []
    for i in range(0, len(all_chunks), batch_size):
        group = all_chunks[i:i + batch_size]
        logits = np.asarray(logits_fn(group))
        parts.extend(nll_from_logits(logits[j], c) for j, c in enumerate(group))
    return summarize(np.concatenate(parts), len(tokens), ctx)

"""Token sampling: greedy, temperature, top-k, top-p; and streaming detokenization that never splits a character."""
from __future__ import annotations

from typing import Callable

import numpy as np

from toolkit.core.errors import ToolkitError


def make_sampler(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None) -> Callable[[np.ndarray], int]:
    if temperature < 0:
        raise ToolkitError(f"temperature must be >= 0, got {temperature}", "use 0 for greedy decoding")
    if not 0 < top_p <= 1:
        raise ToolkitError(f"top-p must be in (0, 1], got {top_p}", "use e.g. --top-p 0.9")
    if top_k < 0:
        raise ToolkitError(f"top-k must be >= 0, got {top_k}", "use 0 to disable it")
    rng = np.random.default_rng(seed)

    def sample(logits: np.ndarray) -> int:
        if temperature == 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / temperature
        order = np.argsort(-z)
        if top_k:
            order = order[:top_k]
        p = np.exp(z[order] - z[order[0]])
        p /= p.sum()
        if top_p < 1:
            keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)
            order, p = order[:keep], p[:keep] / p[:keep].sum()
        return int(rng.choice(order, p=p))

    sample.greedy = temperature == 0  # runtimes that can take the argmax on their device look for this
    return sample


class StreamDecoder:
    """Feed token ids, get printable text: held back while the bytes end inside a UTF-8 character."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        return new

    def flush(self) -> str:
        text = self.decode(self.ids)
        new, self.emitted = text[self.emitted:], len(text)
        return new

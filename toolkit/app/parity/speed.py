"""Timed greedy generation (llama-bench's pp/tg shape): one warm-up, then `repeats` runs, median ± std."""
from __future__ import annotations

import statistics

from toolkit.core.sampling import make_sampler


def _median_std(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def time_generation(rt, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Prefill and decode tokens/s of `rt.generate` (any runtime), each as median and std over `repeats` runs."""
    greedy = make_sampler(0.0)
    # warm-up at the timed length: first-call allocations, lazy initialisation, a CUDA graph for that cache size
    rt.generate(prompt, 4, greedy)
    pre, dec = [], []
    for _ in range(repeats):
        g = rt.generate(prompt, new_tokens, greedy)
        pre.append(g.prefill_tps)
        dec.append(g.decode_tps)
    (p, p_std), (d, d_std) = _median_std(pre), _median_std(dec)
    return {"prefill_tps": p, "prefill_tps_std": p_std, "decode_tps": d, "decode_tps_std": d_std}

"""Quantizers of checkpoints: each module declaring `TARGETS` (toolkit/core/targets.py) is a `toolkit quantize
NAME --format hf` target; the work (GPTQ, RTN, int8) is in checkpoint.py and gptq.py, imported on use."""
from __future__ import annotations

from toolkit.core.targets import Target, discover

_TARGETS: list[Target] | None = None


def registry() -> list[Target]:
    global _TARGETS
    if _TARGETS is None:
        import quant

        _TARGETS = discover(quant)
    return _TARGETS

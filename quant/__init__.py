"""Quantizers of checkpoints: each module declaring `TARGETS` (toolkit/core/targets.py) is a `toolkit quantize
NAME --format hf` target; the work (GPTQ, RTN, int8) is in checkpoint.py and gptq.py, imported on use."""
from __future__ import annotations

from toolkit.core.targets import Target, discover


def registry() -> list[Target]:
    """Every target declared under quant/."""
    return list(discover(__name__))

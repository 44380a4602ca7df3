"""Exporters: one module or package per target format, each declaring its `TARGETS` (toolkit/core/targets.py):
name, options dataclass, entry. `toolkit export NAME` (and `toolkit quantize NAME --format F` for formats that
quantize their own graphs) are generated from them, so a new exporter is one module plus its tests.

An exporter writes to a partial path, verifies the artifact through a runtime from the runtimes registry (never by
importing an engine itself), writes its manifest.json, then renames into place.
"""
from __future__ import annotations

from toolkit.core.targets import Target, discover


def registry() -> list[Target]:
    """Every target declared under exporters/ (read at each CLI start: the declaring modules import light)."""
    return list(discover(__name__))

"""Exporters: one module per target, registered by name so `toolkit export <name>` finds them.

An exporter is `export(bundle, out, options) -> report`: it writes to a partial path, verifies the artifact through
a runtime from the runtimes registry (never by importing an engine itself), then renames into place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ExporterSpec:
    name: str
    description: str
    export: Callable[..., Any]


EXPORTERS: dict[str, ExporterSpec] = {}


def register(spec: ExporterSpec) -> ExporterSpec:
    EXPORTERS[spec.name] = spec
    return spec


from exporters import gguf  # noqa: E402,F401  (registration)

try:  # registers only where onnx/onnxruntime are installed
    from exporters import onnx  # noqa: E402,F401
except ImportError:  # pragma: no cover
    pass

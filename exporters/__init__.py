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


# each exporter registers when its module is first imported, which works only where its packages are installed
# (the GPU machine's stack has no gguf, for one); imported on demand so that one exporter does not pay for another's
# imports (torch's 2 s, for the GGUF writer that needs no torch)
MODULES = {"gguf": "exporters.gguf", "onnx": "exporters.onnx", "mnn": "exporters.mnn"}
EXTRAS = {"gguf": "gguf", "onnx": "onnx", "mnn": "mnn"}


def available(name: str) -> bool:
    """Whether the exporter's packages are installed (it is registered once this returns True)."""
    if name not in EXPORTERS and name in MODULES:
        import importlib

        try:
            importlib.import_module(MODULES[name])
        except ImportError:
            return False
    return name in EXPORTERS


def get(name: str) -> ExporterSpec:
    """The exporter, or a clear error naming the extra to install."""
    from toolkit.core.errors import ToolkitError

    if not available(name):
        raise ToolkitError(f"the {name} exporter's packages are not installed",
                           f"pip install -e '.[{EXTRAS.get(name, name)}]'")
    return EXPORTERS[name]

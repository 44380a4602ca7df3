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


def package_versions(*packages: str) -> dict[str, str | None]:
    """Installed versions for an artifact's manifest (None where a package is absent)."""
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in packages:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return versions


def register(spec: ExporterSpec) -> ExporterSpec:
    EXPORTERS[spec.name] = spec
    return spec


# each exporter registers only where its packages are installed (the GPU machine's stack has no gguf, for one)
try:
    from exporters import gguf  # noqa: E402,F401
except ImportError:  # pragma: no cover
    pass
try:
    from exporters import onnx  # noqa: E402,F401
except ImportError:  # pragma: no cover
    pass

try:
    from exporters import mnn  # noqa: E402,F401
except ImportError:  # pragma: no cover
    pass

EXTRAS = {"gguf": "gguf", "onnx": "onnx", "mnn": "mnn"}


def get(name: str) -> ExporterSpec:
    """The exporter, or a clear error naming the extra to install."""
    from toolkit.errors import ToolkitError

    if name not in EXPORTERS:
        raise ToolkitError(f"the {name} exporter's packages are not installed",
                           f"pip install -e '.[{EXTRAS.get(name, name)}]'")
    return EXPORTERS[name]

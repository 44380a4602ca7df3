"""Targets: what `toolkit export NAME` and `toolkit quantize NAME` run. Each exporter and quantizer declares itself
as a Target, with an options dataclass whose fields carry their help; the CLI generates its commands from them
(toolkit/app/target_commands.py), so a new target is one module plus its tests and the CLI holds no per-format code.

A module (or package `__init__`) of `exporters/` or `quant/` declares a top-level `TARGETS = (Target(...), ...)`.
Such modules import light: the CLI reads them at every start; the work lives in `Target.module`, imported by `run`.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
import os
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


def option(default: Any, help: str, *flags: str) -> Any:
    """An options-dataclass field with its --help text; `flags` replaces the default `--field-name` (e.g.
    "--sym/--asym")."""
    return field(default=default, metadata={"help": help, "flags": flags})


def all_cores() -> int:
    """The CPUs this process may run on (its affinity, which a container or taskset narrows), the default of
    --threads and of eval-parity's --score-threads."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Outcome:
    """What a target wrote and how the CLI reports it: `notes` ((label, text): fallback, warning) and `summary`
    go to stderr, `path` to stdout."""
    path: Path
    summary: str
    notes: list[tuple[str, str]] = field(default_factory=list)
    report: Any = None  # the target's own report object (for callers in Python)


@dataclass
class RunContext:
    """What every target's run() gets besides its own options."""
    load: Callable[[Path], Any]  # the checkpoint loader, with the user's loader options
    threads: int = 1  # CPU threads for the work and the verification
    force: bool = False
    verbose: bool = False
    log: Callable[[str], None] = lambda line: None  # a progress line for stderr
    progress: Callable[[str], Any] | None = None  # label -> context manager giving a (done, total) callback
    # llama.cpp's quantizer on a bundle, (bundle, ftype, threads, workdir) -> {weight name: (GGML type, blocks)}:
    # exporters/gguf's, handed to the quantizers by the app (quant and exporters are siblings and never import
    # each other); `quantize int4 --target gguf:TYPE` solves GPTQ on the types and grids it returns
    gguf_blocks: Callable[..., dict] | None = None


@dataclass(frozen=True)
class Target:
    command: str  # "export" or "quantize"
    name: str  # the subcommand: `toolkit export gguf`, `toolkit quantize int4`
    summary: str  # one line for the group's --help
    help: str  # the subcommand's --help (several formats under one name: each one's help, joined)
    options: type  # a dataclass; each field made with option()
    module: str  # where the entry lives; imported on use
    default_dest: Callable[[Path, Any], Path]  # (input, options) -> output when -o is not given
    input_name: str = "CKPT"  # the input argument as --help names it
    input_help: str = "Checkpoint: Hugging Face folder, GGUF file, MiniMind .pth, NanoChat folder, or a trained run."
    output_help: str = "Output path."
    extra: str | None = None  # the pip extra the module needs, for the error when it is missing
    engine: str | None = None  # a package the module needs: absent -> the target says to install `extra`
    format: str | None = None  # quantizers: the format written; several formats can share one name (--format)
    handles: Callable[[Path], bool] = lambda src: False  # quantizers: SRC is already of this format (--format auto)
    default: bool = False  # quantizers: the format --format auto falls back to
    entry: str = "run"  # the module's function: entry(src, dest, options, ctx) -> Outcome

    def run(self, src: Path, dest: Path, options: Any, ctx: RunContext) -> Outcome:
        from toolkit.core.errors import ToolkitError

        if self.engine is not None and importlib.util.find_spec(self.engine) is None:
            raise ToolkitError(f"`{self.command} {self.name}` needs {self.engine}, which is not installed",
                               f"pip install -e '.[{self.extra or self.engine}]'")
        return getattr(importlib.import_module(self.module), self.entry)(src, dest, options, ctx)


def beside(src: Path, suffix: str) -> Path:
    """DESIGN.md's default output: named after the input (without .pth) and the variant, beside it."""
    return Path(f"{str(src).rstrip('/').removesuffix('.pth')}{suffix}")


def fields(options: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options))


def _declares_targets(path: Path) -> bool:
    """Whether the module's text assigns TARGETS at top level: read before importing, so that the heavy modules
    beside the declarations (torch, onnx) are not imported at every CLI start."""
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError):
        return False
    return any(isinstance(node, (ast.Assign, ast.AnnAssign)) and any(
        isinstance(t, ast.Name) and t.id == "TARGETS" for t in (node.targets if isinstance(node, ast.Assign)
                                                                  else [node.target])) for node in tree.body)


@functools.cache
def discover(package_name: str) -> tuple[Target, ...]:
    """The targets declared by the modules and subpackages of the package (one level down), read once a process."""
    package = importlib.import_module(package_name)
    found: list[Target] = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        base = Path(info.module_finder.path) / info.name
        path = base / "__init__.py" if info.ispkg else base.with_suffix(".py")
        if _declares_targets(path):
            found += importlib.import_module(f"{package_name}.{info.name}").TARGETS
    return tuple(found)

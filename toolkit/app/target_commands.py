"""`toolkit export NAME` and `toolkit quantize NAME`, generated from the targets that exporters/ and quant/ declare
(toolkit/core/targets.py): each options-dataclass field becomes an option with its help and default. Targets of one
name in several formats (`quantize int4`: hf, onnx) share a command with `--format`; an option that means different
things per format says so in its help, and one whose default differs per format takes that format's default."""
from __future__ import annotations

import inspect
import typing
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from toolkit.app.console import Flags, err, out
from toolkit.app.loader_options import OPTIONS as LOADER_OPTIONS
from toolkit.app.loader_options import LoaderOptions, loader_options
from toolkit.core.errors import ToolkitError
from toolkit.core.targets import RunContext, Target, all_cores, fields

COMMON = ("src", "out", "format", "threads", "force", "loader")


def add_commands(group: typer.Typer, targets: list[Target]) -> None:
    """One subcommand of `group` per target name."""
    by_name: dict[str, list[Target]] = defaultdict(list)
    for target in targets:
        by_name[target.name].append(target)
    for name, specs in by_name.items():
        specs.sort(key=lambda t: not t.default)  # the default format's options first
        group.command(name, help=_help(specs), short_help=_short_help(specs))(_command(specs))


def _help(specs: list[Target]) -> str:
    if len(specs) == 1:
        return specs[0].help
    return f"{specs[0].name.upper()}. " + " ".join(f"{t.format}: {t.help}" for t in specs)


def _short_help(specs: list[Target]) -> str:
    if len(specs) == 1:
        return specs[0].summary
    return f"{specs[0].name.upper()} (" + "; ".join(f"{t.format}: {t.summary}" for t in specs) + ")"


def _merged_options(specs: list[Target]) -> list[inspect.Parameter]:
    """The options of every format of one name, each once: same type everywhere, one default or None (then each
    format applies its own), help prefixed by the formats it belongs to where not all formats have it."""
    seen: dict[str, list[tuple[Target, Any, Any, dict]]] = {}
    for target in specs:
        hints = typing.get_type_hints(target.options)
        for f in fields(target.options):
            if f.name in COMMON or f.name in LOADER_OPTIONS:
                raise TypeError(f"{target.options.__name__}.{f.name} collides with a common option")
            seen.setdefault(f.name, []).append((target, hints[f.name], f.default, dict(f.metadata)))
    params = []
    for name, uses in seen.items():
        kinds = {u[1] for u in uses}
        if len(kinds) > 1:
            raise TypeError(f"option {name} has different types across formats: {kinds}")
        kind, defaults = uses[0][1], [u[2] for u in uses]
        same = all(d == defaults[0] for d in defaults)
        helps = [u[3].get("help", "") for u in uses]
        if len(specs) == 1 or (len(uses) == len(specs) and same and len(set(helps)) == 1):
            text = helps[0]
        else:
            text = " ".join(f"{t.format}: {h}" + ("" if same else f" Default: {d}.")
                            for (t, _, d, _), h in zip(uses, helps))
        flags = uses[0][3].get("flags") or (() if kind is bool else (f"--{name.replace('_', '-')}",))
        annotation = Annotated[kind if same else Optional[kind], typer.Option(*flags, help=text)]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                        default=defaults[0] if same else None))
    return params


def _gguf_blocks(*args):
    """llama.cpp's quantizer for the quantizers (RunContext.gguf_blocks): the app wires the two siblings together."""
    from exporters.gguf.exporter import llama_blocks

    return llama_blocks(*args)


def _choose(specs: list[Target], fmt: str | None, src: Path) -> Target:
    formats = {t.format: t for t in specs}
    if fmt is None:
        return specs[0]
    if fmt == "auto":
        return next((t for t in specs if not t.default and t.handles(src)), specs[0])
    if fmt not in formats:
        raise ToolkitError(f"unknown --format '{fmt}'", f"use {', '.join(formats)} or auto")
    return formats[fmt]


def _command(specs: list[Target]):
    first = specs[0]
    params = [inspect.Parameter("src", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                annotation=Annotated[Path, typer.Argument(
                                    metavar=first.input_name, help=first.input_help)]),
              inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
                  Optional[Path], typer.Option("-o", "--out", help=first.output_help)])]
    if len(specs) > 1:
        text = ("; ".join(f"{t.format}: {t.summary}" for t in specs)
                + f"; auto: the format SRC already is, else {first.format}.")
        params.append(inspect.Parameter("format", inspect.Parameter.KEYWORD_ONLY, default="auto",
                                        annotation=Annotated[str, typer.Option("--format", help=text)]))
    params += _merged_options(specs)
    params += [
        inspect.Parameter("threads", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
            Optional[int], typer.Option(help="CPU threads for the work and its verification [default: all cores].",
                                        show_default=False)]),
        inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
            bool, typer.Option(help="Replace an existing output.")]),
        inspect.Parameter("loader", inspect.Parameter.KEYWORD_ONLY, default=LoaderOptions(),
                          annotation=LoaderOptions)]

    def command(src: Path, out: Optional[Path] = None, *, threads: int | None = None, force: bool = False,
                loader: LoaderOptions = LoaderOptions(), format: str | None = None, **options):
        run(specs, src, out, format, options, threads, force, loader)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__ = f"{first.command}_{first.name}"
    command.__doc__ = _help(specs)
    return loader_options(command)


def run(specs: list[Target], src: Path, out_path: Path | None, fmt: str | None, values: dict, threads: int | None,
        force: bool, loader: LoaderOptions) -> None:
    """Choose the format, build its options, run it, print what it says."""
    from toolkit.app.progress import count_progress
    from toolkit.core.outputs import check_destination

    if threads is None:
        threads = all_cores()
    if threads <= 0:
        raise ToolkitError(f"--threads must be positive, got {threads}", "pass e.g. --threads 1")
    target = _choose(specs, fmt, src)
    names = {f.name for f in fields(target.options)}
    options = target.options(**{k: v for k, v in values.items() if k in names and v is not None})
    dest = out_path or target.default_dest(src, options)
    check_destination(dest, force)
    ctx = RunContext(load=loader.load, threads=threads, force=force, verbose=Flags.verbose,
                     log=lambda line: err.print(line), progress=lambda label: count_progress(err, label),
                     gguf_blocks=_gguf_blocks)
    outcome = target.run(src, dest, options, ctx)
    for label, text in outcome.notes:
        err.print(f"[yellow]{label}[/yellow] {text}")
    err.print(outcome.summary)
    out.print(str(outcome.path))

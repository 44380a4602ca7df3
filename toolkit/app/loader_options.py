"""The checkpoint loaders' options, declared once. A command that reads a checkpoint is decorated with
`@loader_options` and takes one `loader: LoaderOptions`; the decorator gives it the six options (--arch, --tokenizer,
--config, --num-heads, --experts-per-tok, --step) in its --help and hands them over as that one object."""
from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer


@dataclass(frozen=True)
class LoaderOptions:
    arch: str | None = None
    tokenizer: Path | None = None
    config: Path | None = None
    num_heads: int | None = None
    experts_per_tok: int | None = None
    step: int | None = None

    def overrides(self) -> dict[str, Any]:
        """Only what the user set: the keyword arguments a checkpoint loader is given."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def load(self, ckpt: Path):
        from toolkit.checkpoints import load_checkpoint

        return load_checkpoint(ckpt, **asdict(self))


# the options as Typer reads them (name -> annotated type); the names are LoaderOptions' fields
OPTIONS: dict[str, Any] = {
    "arch": Annotated[Optional[str], typer.Option(
        "--arch", help="Override the detected architecture (llama, qwen2, qwen3, qwen3_moe, qwen2_moe, "
                       "minimind2_moe, nanochat).")],
    "tokenizer": Annotated[Optional[Path], typer.Option(
        "--tokenizer", help="Folder with tokenizer.json (+ tokenizer_config.json); needed for a .pth without one "
                            "beside it. For NanoChat also a tiktoken BPE file.")],
    "config": Annotated[Optional[Path], typer.Option(
        "--config", help="JSON with what the weights cannot tell (num_attention_heads, num_experts_per_tok, "
                         "rms_norm_eps, rope_theta).")],
    "num_heads": Annotated[Optional[int], typer.Option(
        "--num-heads", help="Attention heads of a MiniMind2 or legacy .pth (released models use 8).")],
    "experts_per_tok": Annotated[Optional[int], typer.Option(
        "--experts-per-tok", help="Experts per token of a MiniMind MoE .pth (MiniMind2: 2, minimind-3: 1).")],
    "step": Annotated[Optional[int], typer.Option(
        "--step", help="Training step of a NanoChat checkpoint folder (default: the latest).")],
}
assert tuple(OPTIONS) == tuple(LoaderOptions.__dataclass_fields__)


def loader_options(command: Callable) -> Callable:
    """Give `command` the loader options after its own; it is called with them as `loader=LoaderOptions(...)`."""
    signature = inspect.signature(command, eval_str=True)  # Typer reads real types, not the module's strings
    if "loader" not in signature.parameters:
        raise TypeError(f"{command.__name__} takes no `loader` parameter")
    params = [p for p in signature.parameters.values() if p.name != "loader"]
    params += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
               for name, annotation in OPTIONS.items()]

    @functools.wraps(command)
    def run(*args, **kwargs):
        loader = LoaderOptions(**{name: kwargs.pop(name, None) for name in OPTIONS})
        return command(*args, loader=loader, **kwargs)

    run.__signature__ = signature.replace(parameters=params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run

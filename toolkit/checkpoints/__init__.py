"""Checkpoint loaders: each module detects its format and turns it into a ModelBundle.

A loader is `detect(path) -> bool` and `load(path, overrides) -> ModelBundle`. None executes code from its input.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from toolkit.bundle import ModelBundle
from toolkit.errors import ToolkitError


@dataclass(frozen=True)
class Loader:
    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, dict[str, Any]], ModelBundle]


LOADERS: dict[str, Loader] = {}


def register(loader: Loader) -> Loader:
    LOADERS[loader.name] = loader
    return loader


def load_checkpoint(path: str | Path, **overrides: Any) -> ModelBundle:
    """Detect the checkpoint's format and load it. Overrides: arch, tokenizer, config, num_heads, experts_per_tok,
    step (NanoChat)."""
    path = Path(path)
    if not path.exists():
        raise ToolkitError(f"checkpoint {path} does not exist", "check the path")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for loader in LOADERS.values():
        if loader.detect(path):
            bundle = loader.load(path, overrides)
            bundle.provenance.setdefault("path", str(path))
            bundle.provenance.setdefault("format", loader.name)
            return bundle.check()
    raise ToolkitError(f"{path} is not a checkpoint the toolkit knows",
                       "pass a Hugging Face directory (config.json + *.safetensors), a GGUF file, a MiniMind .pth, a NanoChat "
                       "checkpoint folder (model_<step>.pt + meta_<step>.json), or a folder written by `toolkit train`")


# nanochat before minimind: both read .pt files; nanochat's have a meta_<step>.json beside them. gguf_file detects
# by the file's magic, so no other loader's file is taken for a GGUF.
from toolkit.checkpoints import gguf_file, hf_dir, nanochat, minimind  # noqa: E402,F401  (registration, in order)

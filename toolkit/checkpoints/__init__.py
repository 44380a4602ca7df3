"""Checkpoint loaders: each module detects its format and turns it into a ModelBundle.

A loader module has `detect(path) -> bool` and `load(path, overrides) -> ModelBundle`; none executes code from its
input. The loader modules import only the core, never this package: the table of loaders is built here, on first use.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError


@dataclass(frozen=True)
class Loader:
    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, dict[str, Any]], ModelBundle]


# nanochat before minimind: both read .pt files; nanochat's have a meta_<step>.json beside them. gguf_file detects
# by the file's magic, so no other loader's file is taken for a GGUF.
_ORDER = (("gguf", "gguf_file"), ("hf", "hf_dir"), ("nanochat", "nanochat"), ("minimind", "minimind"))
_LOADERS: dict[str, Loader] = {}


def loaders() -> dict[str, Loader]:
    """The loaders in detection order, their modules imported on first use."""
    if not _LOADERS:
        import importlib

        for name, module in _ORDER:
            mod = importlib.import_module(f"toolkit.checkpoints.{module}")
            _LOADERS[name] = Loader(name, mod.detect, mod.load)
    return _LOADERS


def load_checkpoint(path: str | Path, **overrides: Any) -> ModelBundle:
    """Detect the checkpoint's format and load it. Overrides: arch, tokenizer, config, num_heads, experts_per_tok,
    step (NanoChat)."""
    path = Path(path)
    if not path.exists():
        raise ToolkitError(f"checkpoint {path} does not exist", "check the path")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    for loader in loaders().values():
        if loader.detect(path):
            bundle = loader.load(path, overrides)
            bundle.provenance.setdefault("path", str(path))
            bundle.provenance.setdefault("format", loader.name)
            return bundle.check()
    raise ToolkitError(f"{path} is not a checkpoint the toolkit knows",
                       "pass a Hugging Face directory (config.json + *.safetensors), a GGUF file, a MiniMind .pth, a NanoChat "
                       "checkpoint folder (model_<step>.pt + meta_<step>.json), or a folder written by `toolkit train`")


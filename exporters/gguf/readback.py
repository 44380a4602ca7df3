"""What a written GGUF holds, for reports: each tensor's block type. (Reading a GGUF back as a checkpoint is the
GGUF loader's job: toolkit/checkpoints/gguf_file.py.)"""
from __future__ import annotations

from pathlib import Path

import gguf


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}

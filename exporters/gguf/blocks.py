"""Quantized tensors placed into a llama.cpp-quantized file: the file comes from llama.cpp's own quantizer (so its
per-tensor types are llama-quantize's for the file type, fallbacks included), then tensors whose codes were solved
here -- GPTQ on the type's grid, or importance-weighted rounding -- overwrite llama.cpp's bytes in place. A tensor
of a given type and shape has one byte size, so the file's layout, offsets and metadata stay llama.cpp's."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.core.bundle import ModelBundle
from toolkit.core.rope_layout import half_to_pairs, pair_permuted_heads, pairs_to_half


def gguf_names(bundle: ModelBundle) -> dict[str, str]:
    """Hugging Face weight name -> GGUF tensor name, for tensors written one to one (not stacked experts)."""
    from exporters.gguf.tensors import plan

    return {t.sources[0]: t.name for t in plan(bundle, "f32") if len(t.sources) == 1 and t.name != "rope_freqs.weight"
            and t.sources[0] in bundle.tensors}


def read_blocks(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """GGUF name -> (GGML type name, the stored bytes [rows, bytes per row]) for every quantized 2-D tensor."""
    import gguf

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                             gguf.GGMLQuantizationType.BF16) or len(t.shape) != 2:
            continue
        out[t.name] = (t.tensor_type.name, np.array(t.data).reshape(int(t.shape[1]), -1))
    return out


def to_file_rows(name: str, blocks: np.ndarray, cfg) -> np.ndarray:
    """Blocks in Hugging Face row order -> the order llama.cpp keeps q/k rows in (pairs); others unchanged."""
    heads = pair_permuted_heads(name, cfg)
    return np.ascontiguousarray(half_to_pairs(blocks, heads)) if heads else blocks


def from_file_rows(name: str, blocks: np.ndarray, cfg) -> np.ndarray:
    heads = pair_permuted_heads(name, cfg)
    return np.ascontiguousarray(pairs_to_half(blocks, heads)) if heads else blocks


def patch(path: Path, replacements: dict[str, tuple[str, np.ndarray]]) -> None:
    """Overwrite tensors of the file in place: GGUF name -> (type name, bytes in file row order). Each must match
    the file's type and byte size for that tensor (a mismatch is a bug: the caller decides what can go in)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    where = {t.name: (t.tensor_type.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors}
    del reader
    with open(path, "r+b") as f:
        for name, (qtype, blocks) in replacements.items():
            file_type, offset, n_bytes = where[name]
            if file_type != qtype or blocks.nbytes != n_bytes:
                raise RuntimeError(f"{name}: {qtype} {blocks.nbytes} bytes cannot replace {file_type} {n_bytes}")
            f.seek(offset)
            f.write(np.ascontiguousarray(blocks, dtype=np.uint8).tobytes())

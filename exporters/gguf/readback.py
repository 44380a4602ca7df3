"""Read a GGUF written for a bundle back into a bundle: every tensor dequantized (gguf-py's dequantizers), q/k rows
returned to the HF layout, experts unstacked. The reference model on it is what llama.cpp must reproduce."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from exporters.gguf.tensors import pair_permuted_heads, plan
from toolkit.bundle import ModelBundle, TensorRef
from toolkit.errors import ToolkitError
from toolkit.rope_layout import pairs_to_half


def tensor_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def bundle_from_gguf(path: Path, bundle: ModelBundle) -> ModelBundle:
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: t for t in reader.tensors}
    cfg = bundle.config
    refs: dict[str, TensorRef] = {}
    for planned in plan(bundle, "f32"):
        if planned.name == "output.weight" and cfg.tie_word_embeddings:
            continue  # a tied head written out for an arch without fallback: the same weights as token_embd
        t = stored.get(planned.name)
        if t is None:
            raise ToolkitError(f"{path.name} lacks tensor {planned.name}", "the file is incomplete")
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(planned.shape)
        if len(planned.sources) > 1:
            parts = {name: data[i] for i, name in enumerate(planned.sources)}
        else:
            parts = {planned.sources[0]: data}
        for name, array in parts.items():
            heads = pair_permuted_heads(name, cfg)
            if heads:
                array = pairs_to_half(array, heads)
            array = np.ascontiguousarray(array)
            refs[name] = TensorRef(name, tuple(array.shape), "float32", None, (lambda x=array: x))
    return ModelBundle(cfg, refs, bundle.tokenizer, dict(bundle.provenance))

"""Quantized checkpoint folders as the loaders read them: this project's int8 layout, GPTQ-v1 4-bit tensors and
llama.cpp blocks (`toolkit_gguf`: codes solved on a GGUF type's own grid), turned into float32 weights on load (the
writing side is quant/checkpoint.py)."""
from __future__ import annotations

from pathlib import Path

import torch

from toolkit.core import gptq_format
from toolkit.core.errors import ToolkitError

INT8_METHOD = "toolkit_int8"
# `P.ggml_blocks` uint8 [rows, bytes]: the tensor exactly as a GGUF file stores it, in Hugging Face row order; its
# GGML type per weight name in quantization_config.tensor_types, the llama.cpp file type in ggml_ftype
GGUF_METHOD = "toolkit_gguf"
EMBED = "model.embed_tokens.weight"


def dequantized_refs(refs: dict, quantization: dict, path: Path) -> tuple[dict, dict]:
    """A quantized folder's tensors as the plain float32 weights the rest of the toolkit computes with (dequantized
    when loaded), and per weight name a loader of its quantized parts."""
    from toolkit.core.bundle import TensorRef

    method = quantization.get("quant_method")
    layout = quantization.get("checkpoint_format", "gptq")
    if method == "gptq":
        if quantization.get("bits") != 4:
            raise ToolkitError(f"{path}: {quantization.get('bits')}-bit GPTQ is not supported", "use 4-bit GPTQ")
        if layout not in gptq_format.FORMATS:
            raise ToolkitError(f"{path}: GPTQ checkpoint_format '{layout}' is not supported",
                               f"save the model as {' or '.join(gptq_format.FORMATS)} (GPTQModel: format='gptq')")
        suffix, parts = "qweight", ("qweight", "qzeros", "scales", "g_idx")
    elif method == INT8_METHOD:
        suffix, parts = "weight_scale", ("weight", "weight_scale")
    elif method == GGUF_METHOD:
        suffix, parts = "ggml_blocks", ("ggml_blocks",)
    else:
        raise ToolkitError(f"{path}: quantization method '{method}' is not supported",
                           "the toolkit reads its own int8 and GGUF-block folders and 4-bit GPTQ (v1) folders")
    # v2 layers' parts carry the mark gptq_format.unpack reads (zero points stored as they are)
    mark = {gptq_format.V2: torch.tensor(True)} if method == "gptq" and layout == "gptq_v2" else {}
    out, raw = dict(refs), {}
    for name in [n for n in refs if n.endswith("." + suffix)]:
        prefix = name[: -len(suffix)]
        missing = [prefix + p for p in parts if prefix + p not in refs]
        if missing:
            raise ToolkitError(f"{path}: quantized layer {prefix[:-1]} lacks {missing[0]}", "the folder is damaged")
        members = {p: out.pop(prefix + p) for p in parts}
        load_parts = lambda m=members, mark=mark: {**{p: r.load() for p, r in m.items()}, **mark}  # noqa: E731
        weight = prefix + "weight"
        if method == "gptq":
            shape = (members["qweight"].shape[1], members["qweight"].shape[0] * gptq_format.PER_INT)
            fn = lambda load=load_parts: gptq_format.dequantize(load())  # noqa: E731
        elif method == GGUF_METHOD:
            shape, fn = _ggml_weight(weight, members["ggml_blocks"].shape, quantization, path, load_parts)
        else:
            shape = members["weight"].shape
            fn = lambda load=load_parts: _int8_dequantize(load())  # noqa: E731
        out[weight] = TensorRef(weight, tuple(shape), torch.float32, fn)
        raw[weight] = load_parts
    if method == "gptq" and quantization.get("toolkit_embed_bits") == 8:
        scale = EMBED.removesuffix("weight") + "weight_scale"
        if EMBED not in out or scale not in out:
            raise ToolkitError(f"{path}: toolkit_embed_bits 8 but {scale} is missing", "the folder is damaged")
        members = {"weight": out.pop(EMBED), "weight_scale": out.pop(scale)}
        out[EMBED] = TensorRef(EMBED, tuple(members["weight"].shape), torch.float32,
                               lambda m=members: _int8_dequantize({p: r.load() for p, r in m.items()}))
    return out, raw


def _ggml_weight(weight: str, byte_shape, quantization: dict, path: Path, load_parts):
    """(shape, loader of float32 values) of a weight stored as GGUF blocks."""
    import gguf

    qtype = (quantization.get("tensor_types") or {}).get(weight)
    if qtype not in gguf.GGMLQuantizationType.__members__:
        raise ToolkitError(f"{path}: no GGML type recorded for {weight} (tensor_types: {qtype!r})",
                           "the folder is damaged")
    shape = tuple(gguf.quants.quant_shape_from_byte_shape(tuple(byte_shape), gguf.GGMLQuantizationType[qtype]))
    return shape, lambda: ggml_dequantize(load_parts()["ggml_blocks"].numpy(), qtype, shape)


def ggml_dequantize(blocks, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """gguf-py's dequantization of stored GGUF blocks (uint8 [rows, bytes]) as float32 of `shape`."""
    import gguf
    import numpy as np

    values = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(values).reshape(shape))


def _int8_dequantize(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    return parts["weight"].float() * parts["weight_scale"].float()[:, None]

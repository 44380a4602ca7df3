"""A GPTQ checkpoint's 4-bit codes written into MNN's weight file as they are, instead of MNN re-quantizing the
dequantized weights.

MNN's 4-bit asymmetric block (read in llm.mnn.weight, measured against the weights it was made from): per
Convolution op, at `external[0]`, a header whose last 16 bytes are the value table -8..7, the codes of the [out, in]
matrix row-major, two per byte (high nibble first), then per (output row, block) the pair (min, scale) in fp32;
weight = min + scale * (nibble - 8). GPTQ's weight = scale * (code - zero) (toolkit/core/gptq_format.py) is the
same number with nibble = code and min = scale * (8 - zero): the grid holds GPTQ's codes exactly when MNN's blocks
are GPTQ's groups (same group size, static groups).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from toolkit.core import gptq_format
from toolkit.core.bundle import ModelBundle

OP_NAME = re.compile(r"^/layers\.(\d+)/(\w+)/(\w+)/Linear$")  # llmexport's names of the decoder's linear layers
VALUE_TABLE = bytes(range(248, 256)) + bytes(range(8))  # int8 -8..7: the nibble's value, as MNN stores the table


def gptq_group_size(bundle: ModelBundle) -> int | None:
    """The checkpoint's GPTQ group size, or None when it is not a 4-bit GPTQ checkpoint."""
    q = bundle.provenance.get("quantization") or {}
    if q.get("quant_method") != "gptq" or q.get("bits") != 4 or not bundle.quantized_parts:
        return None
    return int(q.get("group_size", -1))


def carry(bundle: ModelBundle, folder: Path, group_size: int) -> dict:
    """Overwrite MNN's re-quantized blocks of every GPTQ layer with GPTQ's own codes and scales. Returns how many
    layers were carried and which (if any) could not be, with the reason (those keep MNN's own quantization)."""
    graph = json.loads((folder / "llm.mnn.json").read_text())
    carried, kept = 0, []
    with open(folder / "llm.mnn.weight", "r+b") as f:
        for op in graph["oplists"]:
            m = OP_NAME.match(op.get("name", "")) if op.get("type") == "Convolution" else None
            if not m:
                continue
            name = f"model.layers.{m[1]}.{m[2]}.{m[3]}.weight"
            if name not in bundle.quantized_parts:
                continue
            why = _write(f, op, bundle.quantized_parts[name](), group_size)
            if why:
                kept.append(f"{name}: {why}")
            else:
                carried += 1
    return {"carried_layers": carried, "requantized_layers": kept}


def _write(f, op: dict, parts: dict, group_size: int) -> str:
    codes, scales, zeros, g_idx = gptq_format.unpack(parts)
    main = op["main"]
    out_f, in_f = main["common"]["outputCount"], main["common"]["inputCount"]
    offset, weight_size, scale_size = main["external"][:3]
    groups = in_f // group_size if group_size > 0 else 1
    if tuple(codes.shape) != (out_f, in_f):
        return f"MNN's op is [{out_f}, {in_f}], GPTQ's codes {list(codes.shape)}"
    if not gptq_format.consecutive_groups(g_idx, group_size):
        return "GPTQ's groups are not consecutive columns (act-order without static groups)"
    code_bytes = out_f * in_f // 2
    if scale_size != out_f * groups * 2 * 4:
        return f"MNN's block has {scale_size} scale bytes, not an fp32 (min, scale) pair per group of {group_size}"
    f.seek(offset + weight_size - code_bytes - len(VALUE_TABLE))
    if f.read(len(VALUE_TABLE)) != VALUE_TABLE:
        return "MNN's 4-bit value table is not -8..7"
    c = codes.to(torch.uint8).numpy()
    f.seek(offset + weight_size - code_bytes)
    f.write(((c[:, 0::2] << 4) | c[:, 1::2]).astype(np.uint8).tobytes())
    s = scales.T.numpy().astype(np.float32)  # [out, groups]
    mins = s * (8 - zeros.T.numpy().astype(np.float32))
    f.write(np.stack([mins, s], axis=-1).astype(np.float32).tobytes())
    return ""

"""GPTQ-v1 checkpoint tensors (what AutoGPTQ/GPTQModel save and transformers loads through optimum + GPTQModel).

Per quantized Linear `P` (weight [out, in]) at 4 bits:
- `P.qweight` int32 [in / 8, out]: eight codes of consecutive input rows per int32, row 8i+k in bits 4k..4k+3;
- `P.qzeros` int32 [groups, out / 8]: zero - 1 (the v1 convention), eight output columns per int32, same order;
- `P.scales` fp16 [groups, out];
- `P.g_idx` int32 [in]: the group of each input row (i // group_size: act-order uses static groups here).
Weight = scales[g_idx[i], o] * (code[i, o] - (stored_zero[g_idx[i], o] + 1)).
GPTQModel's v2 layout (`checkpoint_format: gptq_v2`) is the same but for qzeros, which hold the zero point itself
(no - 1, so a zero point of 0 is representable); the loader marks such parts with V2 and unpack reads them so.
"""
from __future__ import annotations

import torch

BITS = 4
PER_INT = 32 // BITS
SHIFTS = torch.arange(0, 32, BITS, dtype=torch.int64)
FORMATS = ("gptq", "gptq_v2")  # quantization_config.checkpoint_format values read here (absent: gptq, v1)
V2 = "checkpoint_format_v2"  # key the loader adds to a v2 layer's parts: qzeros hold the zero point itself


def _pack(values: torch.Tensor) -> torch.Tensor:
    """Pack integers 0..15 of [n·8, m] along dim 0 into int32 [n, m]."""
    v = values.to(torch.int64).reshape(-1, PER_INT, values.shape[-1])
    packed = (v << SHIFTS[None, :, None]).sum(dim=1)
    return (packed - (packed >= 2 ** 31).to(torch.int64) * 2 ** 32).to(torch.int32)  # two's complement in int32


def _unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of _pack: int32 [n, m] -> int64 [n·8, m]."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    return ((p[:, None, :] >> SHIFTS[None, :, None]) & 0xF).reshape(-1, packed.shape[-1])


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """codes [out, in], scales/zeros [groups, out] -> the four GPTQ-v1 tensors."""
    out_f, in_f = codes.shape
    rows = torch.arange(in_f, dtype=torch.int32)
    g_idx = torch.zeros_like(rows) if group_size == -1 else rows // group_size
    return {"qweight": _pack(codes.T.contiguous()), "qzeros": _pack((zeros - 1).T.contiguous()).T.contiguous(),
            "scales": scales.to(torch.float16).contiguous(), "g_idx": g_idx}


def consecutive_groups(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether each input row i is in group i // group_size (-1: one group), the layout MatMulNBits, MNN's blocks and
    Q4_0 hold; AutoGPTQ's act-order without static groups gives other g_idx."""
    n = g_idx.numel()
    return torch.equal(g_idx.long(), torch.arange(n) // (group_size if group_size > 0 else n))


def unpack(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [out, in], scales [groups, out] float32, zeros [groups, out], g_idx [in]) from GPTQ-v1 tensors (v2
    when the parts carry V2)."""
    codes = _unpack(t["qweight"]).T
    zeros = _unpack(t["qzeros"].T.contiguous()).T + (0 if V2 in t else 1)
    return codes, t["scales"].float(), zeros, t["g_idx"].long()


def dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    from toolkit.core.grid import dequantize_groups

    return dequantize_groups(*unpack(t))

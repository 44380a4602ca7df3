"""Stored values -> the floats a GGUF tensor holds, in numpy (no torch: the converter starts 2 s sooner without it).

Sources come as toolkit.core.bundle.NUMPY_BITS arrays: bfloat16 as its uint16 bits. bfloat16 -> float16 goes through a
65,536-entry table indexed by those bits, built once by numpy's float32 -> float16 cast (round to nearest even, as
torch's): every bfloat16 is exactly a float32, so the table is that cast applied once per possible value. It
converts as fast as torch and 3.5x faster than widening to float32 and casting (measured on 6.3M values).
"""
from __future__ import annotations

import numpy as np

from toolkit.core.errors import ToolkitError

_BF16_TO_F16: np.ndarray | None = None


def bf16_to_f16_table() -> np.ndarray:
    global _BF16_TO_F16
    if _BF16_TO_F16 is None:
        with np.errstate(over="ignore"):  # bfloat16 values beyond float16's range become inf, as in torch
            _BF16_TO_F16 = (np.arange(1 << 16, dtype=np.uint32) << 16).view(np.float32).astype(np.float16)
    return _BF16_TO_F16


def convert_into(src: np.ndarray, dtype: str, dst: np.ndarray) -> None:
    """Write `src` (stored as `dtype`) into `dst`, a float16 or float32 array of the same size."""
    src = src.reshape(dst.shape)
    if dtype == "bfloat16" and dst.dtype == np.float16:
        np.take(bf16_to_f16_table(), src, out=dst, mode="clip")  # 'clip': no index checks, out= not buffered
    elif dtype == "bfloat16":
        bits = dst.view(np.uint32)
        bits[...] = src
        bits <<= 16
    else:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is found by require_finite, by the bits
            dst[...] = src


def to_f32(src: np.ndarray, dtype: str) -> np.ndarray:
    out = np.empty(src.shape, np.float32)
    convert_into(src, dtype, out)
    return out


def require_finite(values: np.ndarray, src: np.ndarray, dtype: str, what: str) -> None:
    """Refuse NaN/inf in converted float16/float32 `values`, found by their bits (exponent all ones): one pass over
    what is about to be written, which also catches values the conversion to float16 overflowed (then the
    source `src` is finite and the message says so)."""
    if values.size == 0:
        return
    # non-finite = exponent all ones: as unsigned bits the negative ones are the largest values there are, as signed
    # bits the positive ones are; two reductions, no temporary array (1.5x faster than masking off the sign)
    unsigned, signed, inf = ((np.uint16, np.int16, 0x7C00) if values.dtype == np.float16 else
                             (np.uint32, np.int32, 0x7F800000))
    sign = 1 << (8 * values.itemsize - 1)
    if int(values.view(unsigned).max()) < sign | inf and int(values.view(signed).max()) < inf:
        return
    if bool(np.isfinite(to_f32(src, dtype)).all()):
        raise ToolkitError(f"tensor {what} has values beyond float16's range (|x| > 65504)",
                           "export with --outtype bf16 or f32")
    raise ToolkitError(f"tensor {what} holds NaN or infinite values", "the checkpoint is damaged; export an "
                                                                     "earlier one")

"""Lazy tensor sources: safetensors files and torch pickles read with weights_only=True."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from toolkit.core.bundle import NUMPY_BITS, TensorRef
from toolkit.core.errors import ToolkitError

if TYPE_CHECKING:
    import torch

_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def safetensors_refs(file: Path) -> dict[str, TensorRef]:
    """Header now, data on load() (torch) or array() (numpy) by positioned reads into fresh buffers. Not mmap:
    pages of a mapped file that were read stay resident, so converting a model that way grows the process by the
    whole file."""
    size = file.stat().st_size
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= min(size - 8, 100 * 1024 * 1024):
                raise ValueError("header length is out of range")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ToolkitError(f"cannot read {file}: {e}", "the file is truncated or not a safetensors file; "
                                                      "download or export it again") from None
    base = 8 + n
    refs = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise ToolkitError(f"{file.name}: tensor {name} has unsupported dtype {info.get('dtype')}",
                               "convert the checkpoint to fp32/fp16/bf16")
        shape = tuple(int(d) for d in info["shape"])
        start, end = (int(x) for x in info["data_offsets"])
        ref = TensorRef(name, shape, dtype, None, (lambda o=base + start, nb=end - start, dt=dtype, sh=shape:
                                                   _read(file, o, nb, dt, sh)))
        if end - start != ref.numel * ref.itemsize or base + end > size:
            raise ToolkitError(f"cannot read {file}: tensor {name} lies beyond the end of the file or has the "
                               "wrong byte length", "the file is truncated; download or export it again")
        refs[name] = ref
    return refs


def _read(file: Path, offset: int, nbytes: int, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    buf = bytearray(nbytes)
    with open(file, "rb") as f:
        f.seek(offset)
        if f.readinto(buf) != nbytes:
            raise ToolkitError(f"{file} ended early", "the file is truncated; download or export it again")
    return np.frombuffer(buf, dtype=NUMPY_BITS[dtype]).reshape(shape)


def load_torch_state(file: Path) -> dict[str, "torch.Tensor"]:
    """A torch pickle of tensors, read with weights_only=True (memory-mapped when the format allows)."""
    import torch

    try:
        try:
            obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(str(file), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsafe pickle"
        raise ToolkitError(f"refusing {file.name}: its pickle needs code to load ({first[:160]})",
                           "only plain state dicts are read (weights_only=True); re-save the weights with "
                           "torch.save(model.state_dict(), path) or as safetensors") from None
    except Exception as e:  # torch raises many kinds (RuntimeError, EOFError, KeyError...) on damaged files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ToolkitError(f"cannot read {file}: {reason}", "the file is truncated or not a PyTorch checkpoint") \
            from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # MiniMind resume files and trainer checkpoints: {'model': state_dict, 'optimizer': ...}
    if not isinstance(obj, dict) or not obj:
        raise ToolkitError(f"{file.name} does not hold a state dict", "pass a file saved from model.state_dict()")
    state = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue
        for prefix in ("_orig_mod.", "module."):  # torch.compile and DDP wrappers
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    if not state:
        raise ToolkitError(f"{file.name} holds no tensors", "pass a file saved from model.state_dict()")
    return state


def refs_from_state(state: dict[str, "torch.Tensor"]) -> dict[str, TensorRef]:
    return {n: TensorRef(n, tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in state.items()}

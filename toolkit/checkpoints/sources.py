"""Lazy tensor sources: safetensors files and torch pickles read with weights_only=True."""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from toolkit.bundle import TensorRef
from toolkit.errors import ToolkitError

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def safetensors_refs(file: Path) -> dict[str, TensorRef]:
    """Header-only open: shapes and dtypes now, data on load()."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(file), framework="pt")
        names = list(handle.keys())
        refs = {}
        for name in names:
            sl = handle.get_slice(name)
            dtype = _ST_DTYPES.get(sl.get_dtype())
            if dtype is None:
                raise ToolkitError(f"{file.name}: tensor {name} has unsupported dtype {sl.get_dtype()}",
                                   "convert the checkpoint to fp32/fp16/bf16")
            refs[name] = TensorRef(name, tuple(sl.get_shape()), dtype, (lambda n=name: handle.get_tensor(n)))
        return refs
    except ToolkitError:
        raise
    except Exception as e:  # safetensors raises SafetensorError for truncated or malformed files
        raise ToolkitError(f"cannot read {file}: {e}", "the file is truncated or not a safetensors file; "
                                                      "download or export it again") from None


def load_torch_state(file: Path) -> dict[str, torch.Tensor]:
    """A torch pickle of tensors, read with weights_only=True (memory-mapped when the format allows)."""
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


def refs_from_state(state: dict[str, torch.Tensor]) -> dict[str, TensorRef]:
    return {n: TensorRef(n, tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in state.items()}

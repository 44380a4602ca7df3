"""The reference PyTorch model as a runtime (checkpoints of every loader). Declared here without importing torch;
the implementation is runtime.py, with its CUDA-graph decoder (static_decode.py) and Triton kernels
(triton_gemv.py)."""
from __future__ import annotations

from runtimes import RuntimeSpec


def _is_checkpoint(artifact) -> bool:
    from pathlib import Path

    from toolkit.checkpoints import loaders

    return any(loader.detect(Path(artifact)) for loader in loaders().values())


SPECS = (RuntimeSpec("torch", "reference PyTorch model (checkpoints)", "runtimes.torch_runtime.runtime", "torch",
                     _is_checkpoint, describe=lambda artifact: "checkpoint", on_cuda=lambda: True),)

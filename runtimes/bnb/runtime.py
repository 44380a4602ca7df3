"""bitsandbytes as a runtime: the reference model with its decoder linear layers swapped for bitsandbytes' own
quantized layers, on CPU (bitsandbytes 0.50 ships a CPU backend) or CUDA.

- int8: LLM.int8 (`Linear8bitLt`, outlier threshold 6.0: activation columns above it run in 16 bits).
- nf4: `Linear4bit` NF4, blocks of 64, double quantization on (bitsandbytes 0.50 reloads NF4 saved without it
  wrongly on CPUs with AVX512-BF16), compute in the activations' dtype.
The token embedding and the lm_head stay as they are, as `transformers`' BitsAndBytesConfig leaves them. The layers
are quantized in memory when loaded (that is how bitsandbytes is used), from the checkpoint given.
"""
from __future__ import annotations

import torch

from runtimes.torch_runtime.runtime import TorchRuntime
from toolkit.core.bundle import ModelBundle

MODES = ("int8", "nf4")


def _quiet() -> None:
    import warnings

    # on CPU every int8 call says its fp32 inputs are cast to fp16 for quantization: true, and said once here
    warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def _swap(model: torch.nn.Module, mode: str, device: torch.device, dtype: torch.dtype) -> int:
    import bitsandbytes as bnb

    count = 0
    for layer in model.model.layers:
        for parent in list(layer.modules()):
            for child_name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                w = child.weight.data.detach().to("cpu", torch.float16 if device.type == "cuda" else torch.float32)
                if mode == "int8":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=False,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=dtype,
                                          compress_statistics=True, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(w, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4", blocksize=64)
                setattr(parent, child_name, q.to(device).eval())  # .to() quantizes; eval(): the inference path
                count += 1
    return count


class BnbRuntime(TorchRuntime):
    def __init__(self, bundle: ModelBundle, mode: str, threads: int | None = None, device: str = "cpu"):
        dtype = "float16" if device == "cuda" else "float32"
        # eager decoding: the CUDA-graph step multiplies plain weight matrices, and bitsandbytes' layers hold packed
        # ones (the timing is bitsandbytes' own kernels, as a user of it gets them)
        super().__init__(bundle, threads, device, dtype, cuda_graph=False)
        _quiet()
        self.name = f"bnb_{mode}"
        self.quantized_layers = _swap(self.model, mode, self.device, self.dtype)
        self.label = f"bitsandbytes {mode} {self.device.type}"


def load(artifact, threads: int | None = None, device: str = "cpu", mode: str = "int8", verbose: bool = False,
         ctx: int | None = None, **overrides):
    from toolkit.checkpoints import load_checkpoint

    bundle = artifact if isinstance(artifact, ModelBundle) else load_checkpoint(artifact, **overrides)
    return BnbRuntime(bundle, mode, threads, device)

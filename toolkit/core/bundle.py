"""The canonical model bundle that flows through loaders, quantizers, exporters and runtimes.

A ModelBundle is an ArchConfig, tensors in Hugging Face naming, a tokenizer and provenance. Tensors are TensorRefs:
shape and dtype are known up front, the data is read only when `load()` is called, so a 1B checkpoint can be
inspected or converted one tensor at a time.

torch is imported only when a tensor is loaded as a torch tensor: a ref over a safetensors file also reads its data
as a numpy array (`array()`), so converters that need no model (the GGUF writer) run without torch's 2 s import.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from toolkit.core.arch import ArchConfig
from toolkit.core.errors import ToolkitError
from toolkit.core.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

# dtype name (torch's spelling) -> the numpy dtype that holds its values; numpy has no bfloat16, so its bits are
# carried as uint16 (the upper half of a float32)
NUMPY_BITS = {"float64": np.float64, "float32": np.float32, "float16": np.float16, "bfloat16": np.uint16,
              "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
              "bool": np.bool_}


def dtype_name(dtype: Any) -> str:
    """'bfloat16' for torch.bfloat16 (or the string itself)."""
    return dtype if isinstance(dtype, str) else str(dtype).replace("torch.", "")


@dataclass
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch's name of the stored dtype ('bfloat16', 'float32'...); a torch.dtype is accepted and named
    loader: Callable[[], "torch.Tensor"] | None  # the data as a torch tensor; None: made from `reader`
    reader: Callable[[], np.ndarray] | None = None  # the data as numpy without torch (NUMPY_BITS), where the
    # source allows it (safetensors files)

    def __post_init__(self) -> None:
        self.dtype = dtype_name(self.dtype)
        if self.loader is None and self.reader is None:
            raise ValueError(f"tensor {self.name} has neither a loader nor a reader")

    @property
    def itemsize(self) -> int:
        return np.dtype(NUMPY_BITS[self.dtype]).itemsize

    def load(self) -> "torch.Tensor":
        if self.loader is not None:
            t = self.loader()
        else:
            import torch

            a = self.reader()
            t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if self.dtype == "bfloat16" else \
                torch.from_numpy(a)
        self._check_shape(t.shape)
        return t

    def array(self) -> np.ndarray:
        """The stored values as a numpy array of NUMPY_BITS[dtype] (bfloat16 as its uint16 bits)."""
        if self.reader is not None:
            a = self.reader()
            self._check_shape(a.shape)
            return a
        t = self.load().detach().contiguous()
        if self.dtype == "bfloat16":
            import torch

            return t.view(torch.int16).numpy().view(np.uint16)
        return t.numpy()

    def _check_shape(self, shape) -> None:
        if tuple(shape) != self.shape:
            raise ToolkitError(f"tensor {self.name} read with shape {tuple(shape)}, header says {self.shape}",
                               "the checkpoint file is damaged; export it again")

    def derive(self, fn: Callable[["torch.Tensor"], "torch.Tensor"], shape: tuple[int, ...] | None = None,
               name: str | None = None) -> "TensorRef":
        """A lazily transformed view: fn runs on the data when (and each time) it is loaded."""
        return TensorRef(name or self.name, shape or self.shape, self.dtype, lambda: fn(self.load()))

    def renamed(self, name: str) -> "TensorRef":
        return TensorRef(name, self.shape, self.dtype, self.loader, self.reader)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class ModelBundle:
    config: ArchConfig
    tensors: dict[str, TensorRef]
    tokenizer: Tokenizer
    provenance: dict[str, Any] = field(default_factory=dict)
    # a quantized checkpoint's own parts per weight name (loaders of e.g. GPTQ qweight/qzeros/scales/g_idx), for
    # exporters that can take the codes as they are; `tensors` holds the same weights dequantized
    quantized_parts: dict[str, Callable[[], dict[str, "torch.Tensor"]]] = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, config: ArchConfig, tensors: dict[str, "torch.Tensor"], tokenizer: Tokenizer,
                     provenance: dict[str, Any] | None = None) -> "ModelBundle":
        """A bundle over tensors already in memory (training output, tests)."""
        refs = {n: TensorRef(n, tuple(t.shape), t.dtype, (lambda t=t: t)) for n, t in tensors.items()}
        return cls(config, refs, tokenizer, dict(provenance or {}))

    def check(self) -> "ModelBundle":
        """Refuse a bundle whose tensors do not match its config: missing, extra or wrongly shaped."""
        self.config.validate()
        expected = self.config.expected_shapes()
        missing = [n for n in expected if n not in self.tensors]
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise ToolkitError(f"checkpoint lacks tensor {', '.join(missing[:3])}{more}",
                               f"is it a complete {self.config.family} checkpoint? override with --arch if not")
        for name, shape in expected.items():
            got = self.tensors[name].shape
            if tuple(got) != tuple(shape):
                raise ToolkitError(f"tensor {name} has shape {tuple(got)}, the config expects {tuple(shape)}",
                                   "the config (head counts, sizes) does not match the weights; fix it or pass "
                                   "--config FILE")
        extra = [n for n in self.tensors if n not in expected]
        if extra:
            raise ToolkitError(f"checkpoint has tensors the {self.config.family} architecture does not use: "
                               f"{', '.join(extra[:3])}", "pass --arch if the architecture was detected wrongly")
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ToolkitError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the embedding only "
                               f"{self.config.vocab_size} rows", "pass the tokenizer this model was trained with "
                                                                 "(--tokenizer DIR)")
        return self

    def load(self, name: str, dtype: "torch.dtype | None" = None) -> "torch.Tensor":
        t = self.tensors[name].load()
        return t if dtype is None else t.to(dtype)

    def iter_tensors(self, dtype: "torch.dtype | None" = None) -> Iterator[tuple[str, "torch.Tensor"]]:
        for name in self.tensors:
            yield name, self.load(name, dtype)

    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def dtypes(self) -> dict[str, int]:
        """Parameter count per stored dtype."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            key = t.dtype
            out[key] = out.get(key, 0) + t.numel
        return out

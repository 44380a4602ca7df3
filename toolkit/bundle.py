"""The canonical model bundle that flows through loaders, quantizers, exporters and runtimes.

A ModelBundle is an ArchConfig, tensors in Hugging Face naming, a tokenizer and provenance. Tensors are TensorRefs:
shape and dtype are known up front, the data is read only when `load()` is called, so a 1B checkpoint can be
inspected or converted one tensor at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from toolkit.arch import ArchConfig
from toolkit.errors import ToolkitError
from toolkit.tokenizer import Tokenizer


@dataclass
class TensorRef:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    loader: Callable[[], torch.Tensor]

    def load(self) -> torch.Tensor:
        t = self.loader()
        if tuple(t.shape) != self.shape:
            raise ToolkitError(f"tensor {self.name} read with shape {tuple(t.shape)}, header says {self.shape}",
                               "the checkpoint file is damaged; export it again")
        return t

    def derive(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...] | None = None,
               name: str | None = None) -> "TensorRef":
        """A lazily transformed view: fn runs on the data when (and each time) it is loaded."""
        return TensorRef(name or self.name, shape or self.shape, self.dtype, lambda: fn(self.load()))

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
    quantized_parts: dict[str, Callable[[], dict[str, torch.Tensor]]] = field(default_factory=dict)

    @classmethod
    def from_tensors(cls, config: ArchConfig, tensors: dict[str, torch.Tensor], tokenizer: Tokenizer,
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

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.tensors[name].load()
        return t if dtype is None else t.to(dtype)

    def iter_tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.tensors:
            yield name, self.load(name, dtype)

    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    def dtypes(self) -> dict[str, int]:
        """Parameter count per stored dtype."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            key = str(t.dtype).replace("torch.", "")
            out[key] = out.get(key, 0) + t.numel
        return out

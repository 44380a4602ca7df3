"""Runtimes: one module per engine, registered by name. The harness, `toolkit generate` and the exporters'
self-checks see engines only through this interface:

    runtime = RUNTIMES[name].load(artifact, threads=1, device="cpu")
    runtime.logits(token_ids) -> float32 array [len(token_ids), vocab]   (one fresh sequence)
    runtime.generate(token_ids, n, sampler, stop_ids) -> Generation (ids + timings)
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np


@dataclass
class Generation:
    ids: list[int]  # the new tokens only
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int
    stopped_by: str = "length"  # "length" or "stop"

    @property
    def decode_tps(self) -> float:
        n = max(0, len(self.ids) - 1)  # the first new token comes out of the prefill
        return n / self.decode_seconds if self.decode_seconds > 0 else float("nan")

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")


def decode_loop(first: int, step: Callable[[int], np.ndarray], sampler: Callable[[np.ndarray], int],
                max_new_tokens: int, stop_ids, on_token: Callable[[int], None] | None) -> tuple[list[int], str]:
    """The shared token loop: emit `first`, then feed each token through `step` (-> next logits) until a stop
    token or the budget. Returns (new tokens, "stop" | "length")."""
    out, nxt = [], first
    while True:
        out.append(nxt)
        if on_token:
            on_token(nxt)
        if nxt in stop_ids:
            return out, "stop"
        if len(out) >= max_new_tokens:
            return out, "length"
        nxt = sampler(step(nxt))


class Runtime(Protocol):
    name: str

    def logits(self, token_ids: list[int]) -> np.ndarray: ...

    def generate(self, token_ids: list[int], max_new_tokens: int, sampler: Callable[[np.ndarray], int],
                 stop_ids: list[int] = ..., on_token: Callable[[int], None] | None = ...) -> Generation: ...


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    description: str
    module: str  # imported on first use: a process that runs one engine does not pay for the others (RSS, time)
    engine: str | None = None  # the package the engine needs; absent -> the runtime is not offered
    handles: Callable[[Any], bool] = field(default=lambda artifact: False)  # can it open this artifact path?
    options: dict = field(default_factory=dict)  # fixed arguments of the module's load() (e.g. a mode)

    def load(self, *args, **kwargs) -> Runtime:
        return importlib.import_module(self.module).load(*args, **{**self.options, **kwargs})


def _is_checkpoint(artifact) -> bool:
    from toolkit.checkpoints import LOADERS

    return any(loader.detect(Path(artifact)) for loader in LOADERS.values())


def _is_onnx(artifact) -> bool:
    p = Path(artifact)
    return p.suffix == ".onnx" or (p.is_dir() and (p / "model.onnx").is_file())


def _is_mnn(artifact) -> bool:
    p = Path(artifact)
    return p.suffix == ".mnn" or (p.is_dir() and (p / "model.mnn").is_file())


RUNTIMES: dict[str, RuntimeSpec] = {
    spec.name: spec
    for spec in (
        RuntimeSpec("torch", "reference PyTorch model (checkpoints)", "runtimes.torch_runtime", "torch",
                    _is_checkpoint),
        RuntimeSpec("llama_cpp", "llama.cpp via llama-cpp-python (GGUF files)", "runtimes.llama_cpp", "llama_cpp",
                    lambda artifact: str(artifact).endswith(".gguf")),
        RuntimeSpec("onnxruntime", "ONNX Runtime (toolkit export onnx folders)", "runtimes.onnxruntime",
                    "onnxruntime", _is_onnx),
        RuntimeSpec("mnn", "MNN (toolkit export mnn folders)", "runtimes.mnn", "MNN", _is_mnn),
        # checkpoints quantized in memory by bitsandbytes: chosen by name (eval-parity --with), never by path
        RuntimeSpec("bnb_int8", "bitsandbytes LLM.int8 (Linear8bitLt, threshold 6.0) of a checkpoint",
                    "runtimes.bnb", "bitsandbytes", options={"mode": "int8"}),
        RuntimeSpec("bnb_nf4", "bitsandbytes NF4 with double quantization (Linear4bit) of a checkpoint",
                    "runtimes.bnb", "bitsandbytes", options={"mode": "nf4"}),
    )
    if spec.engine is None or importlib.util.find_spec(spec.engine) is not None
}

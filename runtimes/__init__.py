"""Runtimes: one module per engine, registered by name. The harness, `toolkit generate` and the exporters'
self-checks see engines only through this interface:

    runtime = runtimes.open(artifact, threads=1, device="cpu")     # or registry()[name].load(...)
    runtime.logits(token_ids) -> float32 array [len(token_ids), vocab]   (one fresh sequence)
    runtime.logits_from(token_ids, start) -> [len - start, vocab]   (optional: engines that can skip the head)
    runtime.generate(token_ids, n, sampler, stop_ids) -> Generation (ids + timings)
    runtime.prompt_ids(text), runtime.chat_ids(messages) -> (ids, stop ids), runtime.detokenize(ids)   (Text)

Each engine tokenizes with what its artifact carries (a GGUF its own vocabulary and chat template, an export
folder its tokenizer.json), so `generate` never asks which format it holds.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

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


class Text(Protocol):
    """Text in and out as the artifact itself defines it."""

    def prompt_ids(self, text: str) -> list[int]: ...

    def chat_ids(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        """The conversation through the model's chat template (add_generation_prompt), tokenized as transformers'
        apply_chat_template tokenizes it; and the end-of-turn ids to stop on."""
        ...

    def detokenize(self, ids: list[int]) -> str: ...


class Runtime(Text, Protocol):
    """What the harness, `generate` and the exporters' self-checks call on every engine."""

    name: str
    label: str  # how reports name it (engine, dtype, device)

    def logits(self, token_ids: list[int]) -> np.ndarray: ...

    def generate(self, token_ids: list[int], max_new_tokens: int, sampler: Callable[[np.ndarray], int],
                 stop_ids: list[int] = ..., on_token: Callable[[int], None] | None = ...) -> Generation: ...


# What some engines offer beyond Runtime, for the exporters' self-checks that must drive the engine's own cache or
# batch as the format defines them. An exporter names the one it needs (tests/test_runtime_protocol.py checks that
# nothing else is called on a runtime, and which runtimes offer which).
@runtime_checkable
class Stepping(Protocol):
    """A cache the caller feeds: a fresh sequence, then tokens after the ones already seen (MNN's static cache)."""

    def reset(self) -> None: ...

    def step(self, token_ids: list[int]) -> np.ndarray:
        """Logits [len(token_ids), vocab] of these tokens, continuing the sequence so far."""
        ...


@runtime_checkable
class Batching(Protocol):
    """A batched graph with an attention mask and an explicit cache (ONNX decoders, Optimum's I/O)."""

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: Any = None) -> tuple[np.ndarray, Any]:
        """Logits [B, T, V] of `input_ids` after `past`, and the cache that continues them."""
        ...


@runtime_checkable
class EngineText(Protocol):
    """The tokenizer and chat template an engine applies itself on the device (MNN.llm's tokenizer.mtok and minja),
    for the export's check that they agree with the model's."""

    def engine_ids(self, text: str) -> list[int]: ...

    def engine_chat(self, messages: list[dict[str, str]]) -> str:
        """The conversation rendered by the engine's chat template, with the generation prompt."""
        ...


CAPABILITIES = (Stepping, Batching, EngineText)


class SteppedRun:
    """`logits` and `generate` for a runtime whose engine keeps the cache and offers Stepping (reset, step): a fresh
    sequence each call; the first new token comes out of the prefill, the rest one step each."""

    def logits(self, token_ids: list[int]) -> np.ndarray:
        self.reset()
        return self.step(list(token_ids))

    def generate(self, token_ids: list[int], max_new_tokens: int, sampler: Callable[[np.ndarray], int],
                 stop_ids: list[int] = (), on_token: Callable[[int], None] | None = None) -> Generation:
        import time

        self.reset()
        t0 = time.perf_counter()
        nxt = sampler(self.step(list(token_ids))[-1])
        t1 = time.perf_counter()
        out, stopped = decode_loop(nxt, lambda t: self.step([t])[-1], sampler, max_new_tokens, stop_ids, on_token)
        return Generation(out, t1 - t0, time.perf_counter() - t1, len(token_ids), stopped)


class TokenizerText:
    """Text for runtimes whose artifact carries a Hugging Face tokenizer: `text_tokenizer()` returns it (by default
    the one in the artifact's folder, `self.dir`)."""

    def text_tokenizer(self):
        """The tokenizer.json (+ tokenizer_config.json) of the artifact's folder `self.dir`, read once."""
        from toolkit.core.tokenizer import Tokenizer

        if getattr(self, "_tokenizer", None) is None:
            self._tokenizer = Tokenizer.from_dir(self.dir)
        return self._tokenizer

    def prompt_ids(self, text: str) -> list[int]:
        return self.text_tokenizer().encode(text)

    def chat_ids(self, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
        tok = self.text_tokenizer()
        return tok.tok.encode(tok.render_chat(messages), add_special_tokens=False).ids, tok.end_of_turn_ids()

    def detokenize(self, ids: list[int]) -> str:
        return self.text_tokenizer().decode(ids, skip_special=True)


@dataclass(frozen=True)
class RuntimeSpec:
    """What the registry knows of a runtime without importing its engine. Each runtime module (or package) of
    runtimes/ declares its own in a module-level SPECS tuple; adding a runtime is adding that module."""
    name: str
    description: str
    module: str  # imported on first use: a process that runs one engine does not pay for the others (RSS, time)
    engine: str | None = None  # the package the engine needs; absent -> the runtime is not offered
    handles: Callable[[Any], bool] = field(default=lambda artifact: False)  # can it open this artifact path?
    options: dict = field(default_factory=dict)  # fixed arguments of the module's load() (e.g. a mode)
    describe: Callable[[Any], str] = field(default=lambda artifact: "unknown")  # the format, as reports name it
    on_cuda: Callable[[], bool] = field(default=lambda: False)  # does it run on CUDA where CUDA is?
    with_name: str | None = None  # eval-parity --with NAME: a row of the checkpoint itself in this runtime
    extra: str | None = None  # the pip extra that installs `engine`, for the error when it is missing
    beside: bool = False  # eval-parity also scores every artifact it opens in it, as a row of its own

    def load(self, *args, **kwargs) -> Runtime:
        """The module's load(artifact, threads=, device=, ctx=, verbose=, ...): ctx is the longest sequence the
        caller will run (engines with a fixed context size it; others ignore it)."""
        return importlib.import_module(self.module).load(*args, **{**self.options, **kwargs})


_DECLARED: list[RuntimeSpec] | None = None


def declared() -> list[RuntimeSpec]:
    """Every runtime declared by a module (or package) of runtimes/ in its SPECS tuple, installed or not (light
    modules: the engines are imported by load() only)."""
    global _DECLARED
    if _DECLARED is None:
        import pkgutil

        found: list[RuntimeSpec] = []
        for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
            found += getattr(importlib.import_module(f"{__name__}.{info.name}"), "SPECS", ())
        names = [spec.name for spec in found]
        if len(set(names)) != len(names):
            raise RuntimeError(f"two runtimes share a name: {sorted(names)}")
        _DECLARED = found
    return _DECLARED


def installed(spec: RuntimeSpec) -> bool:
    return spec.engine is None or importlib.util.find_spec(spec.engine) is not None


_REGISTRY: dict[str, RuntimeSpec] | None = None


def registry() -> dict[str, RuntimeSpec]:
    """Every runtime whose engine is installed, by name."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = {spec.name: spec for spec in declared() if installed(spec)}
    return _REGISTRY


def __getattr__(name: str):
    if name == "RUNTIMES":  # `from runtimes import RUNTIMES`: the registry, built on first use
        return registry()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def handling(artifact) -> str | None:
    """The runtime that opens this artifact: the one its manifest names (toolkit/core/manifest.py), else the one
    its format asks for (files of other tools: a .gguf from any converter), the engines' own formats before the
    reference model, whose loaders also read GGUF files."""
    from toolkit.core import manifest

    named = (manifest.read(artifact) or {}).get("runtime") if Path(artifact).exists() else None
    if named in registry():
        return named
    runtimes = registry()
    for spec in sorted(runtimes.values(), key=lambda spec: spec.name == "torch"):
        if spec.handles(artifact):
            return spec.name
    return None


def choose(artifact, name: str | None = None) -> RuntimeSpec:
    """The runtime named, which must open the artifact; or the one its format asks for (the reference model, whose
    loaders then say what is wrong with an unknown path)."""
    from toolkit.core.errors import ToolkitError

    runtimes = registry()
    if name is None:
        return runtimes[handling(artifact) or "torch"]
    if name not in runtimes:
        raise ToolkitError(f"unknown runtime '{name}'", f"available: {', '.join(runtimes)}")
    if not runtimes[name].handles(artifact):
        raise ToolkitError(f"runtime '{name}' cannot open {artifact}",
                           "export the checkpoint for that runtime first (toolkit export ...)")
    return runtimes[name]


def open(artifact, runtime: str | None = None, **kwargs) -> Runtime:  # noqa: A001  (runtimes.open, like io.open)
    """Open an artifact in the runtime named or chosen by its format; kwargs go to the runtime's load()."""
    return choose(artifact, runtime).load(artifact, **kwargs)

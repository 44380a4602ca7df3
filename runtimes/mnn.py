"""MNN: the `mnn` runtime. A folder of MNN's LLM engine (llm_config.json + config.json: `toolkit export mnn`'s
default layout, or MNN's llmexport's) runs in MNN's own engine (runtimes/mnn_llm.py); a `--layout module` folder
(model.mnn + manifest.json) runs here, through the wheel's Python binding (MNN.nn / MNN.expr).

The graph's KV cache is a fixed-capacity buffer per layer, passed in and returned each call; the returned MNN
Vars are fed straight back (no numpy round trip). Capacity grows in steps of 64 slots when a sequence outgrows it,
so decode steps keep the same input shapes and MNN plans the graph once per 64 tokens, not once per token, while
attention never runs over more than 63 empty slots (each step reads and writes the whole buffer).
Embedding rows come from the folder's 16-bit file. Text is decoded with the bundle's tokenizer, never with MNN's
(its binding raises on partial UTF-8).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtimes import RuntimeSpec, SteppedRun, TokenizerText
from toolkit.core import manifest
from toolkit.core.errors import ToolkitError
from toolkit.core.fd_redirect import redirected

CAPACITY_STEP = 64


def _engine():
    with redirected(1):  # MNN's engine prints the CPU's feature flags to the C-level stdout on first import
        import MNN.expr as F
        import MNN.nn as nn
    return nn, F


class MnnRuntime(SteppedRun, TokenizerText):
    name = "mnn"

    def __init__(self, artifact, threads: int = 1, memory_mode: str | None = None):
        p = Path(artifact)
        self.dir = p.parent if p.suffix == ".mnn" else p
        self.meta = manifest.read(self.dir)
        if self.meta is None or self.meta["format"] != "mnn":
            raise ToolkitError(f"{self.dir} has no MNN manifest.json (the graph's names and RoPE tables)",
                               "export the model with `toolkit export mnn`")
        details = self.meta["details"]
        g = details["graph"]
        self.layers, self.kv, self.hd, self.max_positions = (g["num_layers"], g["num_kv_heads"], g["head_dim"],
                                                             g["max_positions"])
        self.embed = np.load(self.dir / details["embedding_file"], mmap_mode="r")
        self.inv_freq = np.asarray(g["rope_inv_freq"], np.float32)
        self.rope_sign = np.float32(g.get("rope_sign", 1))
        self.rope_scale = np.float32(g.get("rope_attention_scaling", 1.0))  # yarn's factor on cos and sin
        nn, self.F = _engine()
        mode = memory_mode or details.get("memory_mode", "normal")
        cache_names = [f"{{}}.{i}.{t}" for i in range(self.layers) for t in ("key", "value")]
        inputs = ["inputs_embeds", "rope_cos", "rope_sin", "position_ids"] + [n.format("past_key_values")
                                                                               for n in cache_names]
        outputs = ["logits"] + [n.format("present") for n in cache_names]
        memory = self.F.MemoryMode.Low if mode == "low" else self.F.MemoryMode.Normal
        self.module = nn.load_module_from_file(str(self.dir / "model.mnn"), inputs, outputs, thread_num=threads,
                                               memory_mode=memory)
        if self.module is None:
            raise ToolkitError(f"MNN cannot load {self.dir / 'model.mnn'}", "export it again")
        self.capacity, self.cache, self.position = 0, [], 0
        bits = (self.meta["quantization"] or {}).get("bits", 16)
        self.label = f"MNN {self.dir.name} ({bits}-bit, {mode} memory)"

    # --- the cache ---
    def _reserve(self, needed: int) -> None:
        if needed > self.max_positions:
            raise ToolkitError(f"{needed} positions exceed the model's {self.max_positions}",
                               "use a shorter prompt or fewer new tokens")
        if needed <= self.capacity:
            return
        capacity = min(-(-needed // CAPACITY_STEP) * CAPACITY_STEP, self.max_positions)
        old = [np.array(v.read()) for v in self.cache]  # once per growth
        self.cache = []
        for array in old or [None] * (2 * self.layers):
            grown = np.zeros([1, self.kv, capacity, self.hd], np.float32)
            if array is not None:
                grown[:, :, :array.shape[2]] = array
            self.cache.append(self.F.const(grown, list(grown.shape), self.F.NCHW, self.F.float))
        self.capacity = capacity

    def reset(self) -> None:
        """A fresh sequence. Stale slots stay in the buffers but are never seen: a query attends only to slots at
        or before its position, all rewritten by then."""
        self.position = 0

    def step(self, token_ids: list[int]) -> np.ndarray:
        """Feed tokens after the ones already seen; logits [len(token_ids), vocab]."""
        n = len(token_ids)
        self._reserve(self.position + n)
        rows = np.asarray(self.embed[np.asarray(token_ids)], np.float32)[None]
        F = self.F
        embeds = F.const(rows, [1, n, rows.shape[-1]], F.NCHW, F.float)
        positions = np.arange(self.position, self.position + n, dtype=np.int32)
        angles = positions.astype(np.float32)[:, None] * self.inv_freq[None]
        angles = np.concatenate([angles, angles], axis=-1)[None]  # [1, n, hd], as the reference's rotary table
        cos, sin = np.cos(angles), np.sin(angles)
        if self.rope_scale != 1:
            cos, sin = cos * self.rope_scale, sin * self.rope_scale
        cos = F.const(cos, list(angles.shape), F.NCHW, F.float)
        sin = F.const(self.rope_sign * sin, list(angles.shape), F.NCHW, F.float)
        outs = self.module.forward([embeds, cos, sin, F.const(positions[None], [1, n], F.NCHW, F.int),
                                    *self.cache])
        self.cache = list(outs[1:])
        self.position += n
        return np.array(outs[0].read(), dtype=np.float32).reshape(n, -1)


def load(artifact, threads: int | None = None, device: str = "cpu", memory_mode: str | None = None, **_):
    from runtimes.mnn_llm import MnnLlmRuntime, is_engine_folder

    if is_engine_folder(artifact):
        return MnnLlmRuntime(artifact, threads=threads or 1, memory_mode=memory_mode)
    return MnnRuntime(artifact, threads=threads or 1, memory_mode=memory_mode)


def _is_mnn(artifact) -> bool:
    from runtimes.mnn_llm import is_engine_folder

    p = Path(artifact)
    return p.suffix == ".mnn" or (p.is_dir() and (p / "model.mnn").is_file()) or is_engine_folder(p)


def _describe(artifact) -> str:
    from runtimes.mnn_llm import is_engine_folder, weight_bits

    engine = is_engine_folder(artifact)
    p = Path(artifact)
    folder = p.parent if engine and p.is_file() else p
    return f"mnn {weight_bits(folder, manifest.read(folder))}-bit" + (" engine" if engine else "")


SPECS = (RuntimeSpec("mnn", "MNN (MNN.llm engine folders; toolkit export mnn --layout module folders)",
                     "runtimes.mnn", "MNN", _is_mnn, describe=_describe),)

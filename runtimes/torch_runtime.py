"""The reference PyTorch model as a runtime: fp32 on CPU, fp16/bf16/fp32 on CUDA, static preallocated KV cache."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from runtimes import Generation, decode_loop
from toolkit.bundle import ModelBundle
from toolkit.model import KVCache, build_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchRuntime:
    name = "torch"

    def __init__(self, bundle: ModelBundle, threads: int | None = None, device: str = "cpu",
                 dtype: str = "float32"):
        if threads:
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = build_model(bundle, self.dtype, self.device)
        self.label = f"torch {dtype} {self.device.type}"

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> np.ndarray:
        ids = torch.tensor([token_ids], device=self.device)
        return self.model(ids)[0].float().cpu().numpy()

    @torch.no_grad()
    def generate(self, token_ids: list[int], max_new_tokens: int, sampler: Callable[[np.ndarray], int],
                 stop_ids: list[int] = (), on_token: Callable[[int], None] | None = None) -> Generation:
        cache = KVCache(self.bundle.config, 1, len(token_ids) + max_new_tokens, self.dtype, self.device)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        t0 = time.perf_counter()
        logits = self.model(torch.tensor([token_ids], device=self.device), cache=cache, last_only=True)
        nxt = sampler(logits[0, -1].float().cpu().numpy())
        sync()
        t1 = time.perf_counter()

        def step(token: int) -> np.ndarray:
            return self.model(torch.tensor([[token]], device=self.device), cache=cache)[0, -1].float().cpu().numpy()

        out, stopped = decode_loop(nxt, step, sampler, max_new_tokens, stop_ids, on_token)
        sync()
        return Generation(out, t1 - t0, time.perf_counter() - t1, len(token_ids), stopped)


def load(artifact, threads: int | None = None, device: str = "cpu", dtype: str = "float32", **overrides):
    from toolkit.checkpoints import load_checkpoint

    bundle = artifact if isinstance(artifact, ModelBundle) else load_checkpoint(artifact, **overrides)
    return TorchRuntime(bundle, threads, device, dtype)

"""The reference PyTorch model as a runtime: fp32 on CPU, fp16/bf16/fp32 on CUDA, static preallocated KV cache.

On CUDA, decoding replays one recorded CUDA graph per token (static_decode.py beside this file), built from Triton
kernels where Triton is installed (triton_gemv.py: fused matrix-vector products and attention), and greedy decoding
takes the argmax on the device. Mixture-of-experts models, whose routing has data-dependent shapes, decode eagerly.
"""
from __future__ import annotations

import importlib.util
import time
from typing import Callable

import numpy as np
import torch

from runtimes import Generation, TokenizerText, decode_loop
from runtimes.torch_runtime import static_decode
from toolkit.core.bundle import ModelBundle
from toolkit.core.model import KVCache, build_model

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchRuntime(TokenizerText):
    name = "torch"

    def __init__(self, bundle: ModelBundle, threads: int | None = None, device: str = "cpu",
                 dtype: str = "float32", cuda_graph: bool = True):
        if threads:
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = build_model(bundle, self.dtype, self.device)
        self.use_graph = cuda_graph and self.device.type == "cuda" and static_decode.supports(self.model)
        self.fused = self.use_graph and importlib.util.find_spec("triton") is not None
        self._graph: static_decode.GraphDecoder | None = None  # the latest one: a cache and its recorded step
        how = "CUDA graph, Triton kernels" if self.fused else "CUDA graph"
        self.label = f"torch {dtype} {self.device.type}" + (f" ({how})" if self.use_graph else "")

    def text_tokenizer(self):
        return self.bundle.tokenizer

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> np.ndarray:
        ids = torch.tensor([token_ids], device=self.device)
        return self.model(ids)[0].float().cpu().numpy()

    def _graph_decoder(self, tokens: int) -> static_decode.GraphDecoder:
        limit = max(tokens, self.bundle.config.max_position_embeddings)
        capacity = static_decode.capacity_for(tokens, limit)
        if self._graph is None or self._graph.capacity != capacity:
            self._graph = None  # free the old cache before the new one is allocated
            self._graph = static_decode.GraphDecoder(self.model, capacity, fused=self.fused)
        return self._graph

    @torch.no_grad()
    def generate(self, token_ids: list[int], max_new_tokens: int, sampler: Callable[[np.ndarray], int],
                 stop_ids: list[int] = (), on_token: Callable[[int], None] | None = None) -> Generation:
        if self.use_graph:
            return self._generate_graph(token_ids, max_new_tokens, sampler, stop_ids, on_token)
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

    def _generate_graph(self, token_ids, max_new_tokens, sampler, stop_ids, on_token) -> Generation:
        decoder = self._graph_decoder(len(token_ids) + max_new_tokens)  # recorded before the clock starts
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        nxt = sampler(decoder.prefill(token_ids))  # .cpu() inside: synchronised
        t1 = time.perf_counter()
        out, stopped = decoder.decode(nxt, max_new_tokens, sampler, stop_ids, on_token,
                                      greedy=getattr(sampler, "greedy", False))
        torch.cuda.synchronize()
        return Generation(out, t1 - t0, time.perf_counter() - t1, len(token_ids), stopped)


def load(artifact, threads: int | None = None, device: str = "cpu", dtype: str = "float32", verbose: bool = False,
         ctx: int | None = None, **overrides):  # ctx: no fixed context to size
    from toolkit.checkpoints import load_checkpoint

    bundle = artifact if isinstance(artifact, ModelBundle) else load_checkpoint(artifact, **overrides)
    return TorchRuntime(bundle, threads, device, dtype)

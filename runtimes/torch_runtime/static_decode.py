"""Decode steps with every shape fixed, so that one step can be captured in a CUDA graph and replayed per token.

The reference model's cached decode is correct but launch-bound on a GPU: each token issues a few hundred small
kernels from Python, and the GPU waits for the host between them (~100 tok/s on mm26 whatever the model's size).
`StaticStep` computes the same function as `Decoder` for one new token, with the position held in a tensor instead
of a Python int, q/k/v and gate/up fused into one matrix each (two launches fewer per layer, read in one pass), and
attention over the whole preallocated cache with a mask of the slots already written. Nothing in it depends on
host values, so `GraphDecoder` records it once per cache capacity and replays it: one launch per token.

With `fused=True` (CUDA with Triton, what the torch runtime uses there) the step's matrix products, attention and
argmax are this project's Triton kernels (runtimes/torch_runtime/triton_gemv.py): 5 launches per layer instead of ~20.

The prefill runs through the reference model itself, writing into the same cache storage. Greedy decoding can stay
on the device: each replay also writes argmax(logits) as the next input token, so the host reads tokens back only
every few steps (to check stop tokens) instead of waiting for every token's logits.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.model import Decoder, KVCache, rotate_half

CAPACITY_STEP = 256  # caches (and their graphs) come in multiples of this many positions, so graphs are reused
GREEDY_CHUNK = 16  # greedy tokens decoded on the device between two reads of the host


def supports(model: Decoder) -> bool:
    """Mixture-of-experts routing picks experts by value (data-dependent shapes): no static step for it. Layers
    swapped for other kinds (bitsandbytes' packed weights) are not plain matrices the step can multiply. Dynamic NTK
    RoPE recomputes its frequencies from the host-side sequence length, which a recorded step cannot follow."""
    plain = all(type(mod) is nn.Linear for layer in model.model.layers for mod in layer.modules()
                if isinstance(mod, nn.Linear))
    return plain and not model.config.fam.moe and not model.rope.dynamic


class StaticStep(nn.Module):
    """One token through `model` at `pos` over a [layers, B, kv, capacity, hd] cache; shapes fixed."""

    def __init__(self, model: Decoder, capacity: int, batch: int = 1, fused: bool = False):
        super().__init__()
        if not supports(model):
            raise ValueError("mixture-of-experts models and dynamic RoPE scaling have no static decode step")
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.capacity = capacity
        weight = model.lm_head.weight
        dtype, device = weight.dtype, weight.device
        shape = (cfg.num_layers, batch, self.nkv, capacity, self.hd)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots = torch.arange(capacity, device=device)
        # fused: the products run as Triton matrix-vector kernels with the norms, SiLU gate and residual adds
        # folded in (runtimes/torch_runtime/triton_gemv.py); batch 1 and the gated MLP only
        self.fused = fused and batch == 1 and cfg.fam.mlp == "swiglu" and cfg.fam.norm_weights
        if self.fused:
            from runtimes.torch_runtime import triton_gemv
            self.kernels = triton_gemv  # imported here: CPU installs have no Triton
            self.inv_freq = model.rope.inv_freq.to(device=device, dtype=torch.float32)
            self.attn_scratch = triton_gemv.attend_scratch(self.nh, self.hd, capacity, device)
        # fused projections: one read of the layer input per matrix, two launches fewer per layer
        self.qkv_w, self.qkv_b, self.gate_up_w = [], [], []
        for layer in model.model.layers:
            att = layer.self_attn
            self.qkv_w.append(torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
            self.qkv_b.append(torch.cat([att.q_proj.bias, att.k_proj.bias, att.v_proj.bias])
                              if att.q_proj.bias is not None else None)
            mlp = layer.mlp
            self.gate_up_w.append(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                                  if cfg.fam.mlp == "swiglu" else None)

    def prefill_cache(self) -> KVCache:
        """A reference-model cache whose keys/values are views of this step's storage (prefill writes them here)."""
        batch = self.k.shape[1]
        cache = KVCache.__new__(KVCache)
        cache.k, cache.v = list(self.k.unbind(0)), list(self.v.unbind(0))
        cache.valid = torch.ones(batch, self.capacity, dtype=torch.bool, device=self.k.device)
        cache.max_len, cache.pos = self.capacity, 0
        return cache

    def forward(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """token [B, 1] int64, pos [B] int64 (the slot this token takes) -> logits [B, V] in the model's dtype."""
        if self.fused:
            return self._forward_fused(token, pos)
        m = self.model
        x = m.model.embed_tokens(token)  # [B, 1, H]
        if m.model.embed_norm:
            x = m.model.norm(x)
        cos, sin = m.rope(pos[:, None], x.dtype)  # [B, 1, 1, hd]
        visible = (self.slots[None, :] <= pos[:, None])[:, None, None, :]  # [B, 1, 1, C]
        for i, layer in enumerate(m.model.layers):
            qkv = F.linear(layer.input_layernorm(x), self.qkv_w[i], self.qkv_b[i])
            x = x + layer.self_attn.o_proj(self._attend(i, qkv, cos, sin, pos, visible))
            h = layer.post_attention_layernorm(x)
            if self.gate_up_w[i] is not None:
                gate, up = F.linear(h, self.gate_up_w[i]).chunk(2, dim=-1)
                x = x + layer.mlp.down_proj(F.silu(gate) * up)
            else:
                x = x + layer.mlp(h)
        return self._softcap(m.lm_head(m.model.norm(x))[:, 0])

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.cfg.logit_softcap
        return (cap * torch.tanh(logits.float() / cap)).to(logits.dtype) if cap else logits

    def _attend(self, i: int, qkv: torch.Tensor, cos, sin, pos, visible) -> torch.Tensor:
        """q/k norm, RoPE, cache write and attention of layer i for one token: qkv [B, 1, (nh + 2 nkv) hd] ->
        attention output [B, 1, nh hd]."""
        att = self.model.model.layers[i].self_attn
        B = qkv.shape[0]
        q_dim, kv_dim = self.nh * self.hd, self.nkv * self.hd
        q = qkv[..., :q_dim].view(B, 1, self.nh, self.hd)
        k = qkv[..., q_dim:q_dim + kv_dim].view(B, 1, self.nkv, self.hd)
        v = qkv[..., q_dim + kv_dim:].view(B, self.nkv, 1, self.hd)
        if att.q_norm is not None:
            q, k = att.q_norm(q), att.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, heads, 1, hd]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        # this token's key/value into its slot (batch 1 in generation: one position for the batch)
        self.k[i].index_copy_(2, pos[:1], k)
        self.v[i].index_copy_(2, pos[:1], v)
        # grouped-query attention without copying the cache: the heads sharing a kv head become its queries
        qg = q.reshape(B, self.nkv, self.nh // self.nkv, self.hd)
        out = F.scaled_dot_product_attention(qg, self.k[i], self.v[i], attn_mask=visible)
        return out.reshape(B, 1, q_dim)

    def _forward_fused(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        m, gemv, attend = self.model, self.kernels.gemv, self.kernels.attend
        eps = self.cfg.rms_norm_eps
        x = m.model.embed_tokens(token).reshape(-1)  # [H]
        if m.model.embed_norm:
            x = m.model.norm(x)
        for i, layer in enumerate(m.model.layers):
            att = layer.self_attn
            qkv = gemv(x, self.qkv_w[i], norm=layer.input_layernorm.weight, norm_eps=eps)
            if self.qkv_b[i] is not None:
                qkv = qkv + self.qkv_b[i]
            out = attend(qkv, self.k[i], self.v[i], self.inv_freq, m.rope.sign, pos, self.nh, self.nkv, self.hd,
                         att.q_norm.weight if att.q_norm is not None else None,
                         att.k_norm.weight if att.k_norm is not None else None, eps, self.attn_scratch,
                         rope_scale=m.rope.attention_scaling)
            x = gemv(out, att.o_proj.weight, residual=x)
            gate_up = gemv(x, self.gate_up_w[i], norm=layer.post_attention_layernorm.weight, norm_eps=eps)
            x = gemv(gate_up, layer.mlp.down_proj.weight, glu=True, residual=x)
        logits = gemv(x, m.lm_head.weight, norm=m.model.norm.weight, norm_eps=eps)
        return self._softcap(logits[None])


class GraphDecoder:
    """Prefill with the reference model, then decode one token per replay of a recorded `StaticStep` (CUDA), or
    per call of it (CPU: the same arithmetic, used by the tests that hold it to the reference model)."""

    def __init__(self, model: Decoder, capacity: int, use_graph: bool | None = None, compile_step: bool = False,
                 fused: bool = False):
        device = model.lm_head.weight.device
        self.use_graph = device.type == "cuda" if use_graph is None else use_graph
        self.step = StaticStep(model, capacity, fused=fused)
        # torch.compile fuses the step's elementwise work (norms, RoPE, SiLU, residuals) into fewer kernels; the
        # graph is still recorded here, around the compiled code
        self.run_step = (torch.compile(self.step, fullgraph=True, dynamic=False, mode="max-autotune-no-cudagraphs")
                         if compile_step else self.step)
        self.model, self.capacity = model, capacity
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self.generated = torch.zeros(capacity + 1, dtype=torch.long, device=device)
        self.logits = None
        self.graph = None
        if self.use_graph:
            self._capture()

    def _advance(self) -> None:
        """step + bookkeeping, all on the device: logits, next greedy token into the input, position + 1."""
        self.logits = self.run_step(self.token, self.pos)
        if self.step.fused:
            self.step.kernels.greedy_advance(self.logits[0], self.token, self.pos, self.generated)
            return
        nxt = self.logits.argmax(-1, keepdim=True)  # [1, 1]
        self.generated.index_copy_(0, self.pos + 1, nxt[0])
        self.token.copy_(nxt)
        self.pos.add_(1)

    @torch.no_grad()
    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream (cuBLAS handles, SDPA workspaces)
            for _ in range(3):
                self._advance()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._advance()
        self.step.k.zero_()
        self.step.v.zero_()

    def _replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._advance()

    @torch.no_grad()
    def prefill(self, prompt: list[int]) -> np.ndarray:
        """Last-position logits of the prompt (float32, host); the cache then holds the prompt."""
        if len(prompt) >= self.capacity:
            raise ValueError(f"prompt of {len(prompt)} tokens does not fit a cache of {self.capacity}")
        ids = torch.tensor([prompt], device=self.token.device)
        logits = self.model(ids, cache=self.step.prefill_cache(), last_only=True)[0, -1]
        self.pos.fill_(len(prompt))
        return logits.float().cpu().numpy()

    @torch.no_grad()
    def decode(self, first: int, max_new_tokens: int, sampler: Callable[[np.ndarray], int], stop_ids=(),
               on_token: Callable[[int], None] | None = None, greedy: bool = False) -> tuple[list[int], str]:
        """Tokens after the prompt, `first` (sampled from the prefill) included, as decode_loop returns them."""
        from runtimes import decode_loop

        budget = min(max_new_tokens, self.capacity - int(self.pos.item()))
        self.token.fill_(first)
        if not greedy:
            def step(token: int) -> np.ndarray:
                self.token.fill_(token)
                self._replay()
                return self.logits[0].float().cpu().numpy()

            return decode_loop(first, step, sampler, budget, stop_ids, on_token)
        # greedy on the device: replay a chunk, then read its tokens back and look for a stop token
        out, start = [first], int(self.pos.item())
        if on_token:
            on_token(first)
        if first in stop_ids:
            return out, "stop"
        while len(out) < budget:
            n = min(GREEDY_CHUNK, budget - len(out))
            for _ in range(n):
                self._replay()
            done = start + len(out)
            for t in self.generated[done:done + n].tolist():
                out.append(t)
                if on_token:
                    on_token(t)
                if t in stop_ids:
                    return out, "stop"
        return out, "length"


def capacity_for(tokens: int, limit: int) -> int:
    """The cache capacity for `tokens` positions: the next multiple of CAPACITY_STEP, at most `limit`."""
    return max(tokens, min(limit, -(-tokens // CAPACITY_STEP) * CAPACITY_STEP))

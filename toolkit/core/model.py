"""Reference PyTorch decoder for every family of the architecture table.

Parameter names are the Hugging Face names, so a bundle's tensors load without renaming. The math follows
transformers' Llama/Qwen2/Qwen3/Qwen3-MoE/Qwen2-MoE/NanoChat classes (tests hold it to them within 1e-4 in fp32).

Generation uses a preallocated KV cache and an explicit boolean mask on every cached step: SDPA's `is_causal=True`
aligns its triangle to the top-left corner, which is wrong once queries start at a past offset.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core import rope
from toolkit.core.arch import ArchConfig
from toolkit.core.bundle import ModelBundle


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weighted: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if weighted else None  # NanoChat's norms have no weight
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype) if self.weight is None else self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryTable:
    """cos/sin for given positions, computed in fp32 as transformers' rotary embedding does (frequencies and the
    attention scaling that multiplies cos and sin from toolkit/core/rope.py), then cast to the activations' dtype.

    Dynamic NTK scaling recomputes the frequencies from each call's longest position once it passes
    max_position_embeddings, as transformers does in its forward. (transformers also keeps the largest frequencies
    it has made until a call is shorter than max_position_embeddings again; each call here uses its own length,
    which is the same thing for every sequence fed in order.)"""

    def __init__(self, cfg: ArchConfig):
        # made on the CPU explicitly: build_model constructs modules on the meta device
        with torch.device("cpu"):
            self.inv_freq, self.attention_scaling = rope.for_config(cfg)
        self.config = cfg
        self.dynamic = rope.is_dynamic(cfg)
        self.sign = cfg.fam.rope_sign  # -1: rotation by -theta (NanoChat), the standard rotation with sin negated
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv = self._by_device.get(positions.device)
        if inv is None:
            inv = self._by_device[positions.device] = self.inv_freq.to(positions.device)
        if self.dynamic:
            seq_len = int(positions.max()) + 1
            if seq_len > self.config.max_position_embeddings:
                with torch.device("cpu"):
                    inv = rope.for_config(self.config, seq_len)[0].to(positions.device)
        freqs = positions.float()[..., None] * inv  # [B, T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:  # yarn
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        if self.sign < 0:
            sin = -sin
        return cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # [B, 1, T, hd]


class MLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ReluSquaredMLP(nn.Module):
    """NanoChat's MLP: fc2(relu(fc1(x))^2), no gate."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.fc1 = nn.Linear(hidden, inter, bias=False)
        self.fc2 = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)).square())


class MoE(nn.Module):
    """Softmax router, top-k experts (optionally renormalised), optional shared expert (optionally sigmoid-gated)."""

    def __init__(self, cfg: ArchConfig):
        super().__init__()
        fam = cfg.fam
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.shared_expert = MLP(cfg.hidden_size, cfg.shared_expert_intermediate_size) if fam.shared_expert else None
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False) if fam.shared_expert_gated else None
        # for verifying an engine that routes at lower precision (toolkit/core/routing_ties.py): record each token's
        # gap between its k-th and (k+1)-th router logit, and take the (k+1)-th expert instead of the k-th at
        # the token rows in `swap`
        self.record_gaps = False
        self.gaps: torch.Tensor | None = None
        self.swap: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        logits = self.gate(flat)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        if self.record_gaps or self.swap:
            weights, chosen = self._route_for_verification(logits, probs)
        else:
            weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        if self.shared_expert is not None:
            shared = self.shared_expert(flat)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(flat)) * shared
            out = out + shared
        return out.reshape(shape)

    def _route_for_verification(self, logits: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.top_k
        if k >= probs.shape[-1]:  # every expert is chosen: no choice to record or swap
            self.gaps = torch.full(probs.shape[:1], float("inf"))
            return torch.topk(probs, k, dim=-1)
        weights, chosen = torch.topk(probs, k + 1, dim=-1)
        top = logits.float().gather(-1, chosen)
        self.gaps = (top[:, k - 1] - top[:, k]).detach()
        if self.swap:
            rows = torch.tensor(sorted(self.swap))
            weights[rows, k - 1], chosen[rows, k - 1] = weights[rows, k], chosen[rows, k]
        return weights[:, :k], chosen[:, :k]


class KVCache:
    """Preallocated keys/values [B, kv_heads, max_len, head_dim] per layer, plus which key slots are real tokens."""

    def __init__(self, cfg: ArchConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0
        self.valid.fill_(True)


class Attention(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        fam = cfg.fam
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=fam.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=fam.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=fam.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps, fam.norm_weights) if fam.qk_norm else None
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps, fam.norm_weights) if fam.qk_norm else None

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            end = cache.pos + T
            cache.k[layer][:, :, cache.pos:end] = k
            cache.v[layer][:, :, cache.pos:end] = v
            k, v = cache.k[layer][:, :, :end], cache.v[layer][:, :, :end]
        if self.nkv != self.nh:  # expand kv heads: works with every SDPA backend and mask
            k = k.repeat_interleave(self.nh // self.nkv, dim=1)
            v = v.repeat_interleave(self.nh // self.nkv, dim=1)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class Block(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        fam = cfg.fam
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fam.norm_weights)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fam.norm_weights)
        if fam.moe:
            self.mlp = MoE(cfg)
        elif fam.mlp == "relu2":
            self.mlp = ReluSquaredMLP(cfg.hidden_size, cfg.intermediate_size)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.fam.norm_weights)
        # NanoChat normalises the embeddings too (weightless, so the final norm's module serves both)
        self.embed_norm = cfg.fam.embed_norm


class Decoder(nn.Module):
    def __init__(self, cfg: ArchConfig):
        super().__init__()
        self.config = cfg
        self.model = Body(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rope = RotaryTable(cfg)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                last_only: bool = False, logits_from: int = 0) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with last_only; [B, T - logits_from, V] from position logits_from on:
        the output head, a quarter of a small model's compute at a 150K vocabulary, runs only where asked).

        attention_mask: [B, past + T] with 1 for real tokens (left padding), as transformers takes it.
        Without a cache and a mask the whole sequence is one causal prefill.
        """
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        if cache is not None and past + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; {past + T} needed")
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past, past + T, device=input_ids.device).expand(B, T)
        mask = None
        if cache is not None or attention_mask is not None:
            mask = self._mask(B, T, past, cache, attention_mask, input_ids.device)
        x = self.model.embed_tokens(input_ids)
        if self.model.embed_norm:
            x = self.model.norm(x)
        cos, sin = self.rope(position_ids, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.pos += T
        if last_only:
            x = x[:, -1:]
        elif logits_from:
            x = x[:, logits_from:]
        logits = self.lm_head(self.model.norm(x))
        cap = self.config.logit_softcap
        if cap:
            logits = (cap * torch.tanh(logits.float() / cap)).to(logits.dtype)
        return logits

    @staticmethod
    def _mask(B, T, past, cache, attention_mask, device) -> torch.Tensor:
        S = past + T
        if cache is not None:
            if attention_mask is not None:
                cache.valid[:, :S] = attention_mask[:, -S:].bool()
            key_valid = cache.valid[:, :S]
        else:
            key_valid = attention_mask.bool()
        q_pos = torch.arange(past, S, device=device)[:, None]
        k_pos = torch.arange(S, device=device)[None, :]
        causal = k_pos <= q_pos  # [T, S]
        allowed = causal[None] & key_valid[:, None, :]
        # a padding query would attend nothing (NaN); let it see itself, its output is never used
        allowed |= (k_pos == q_pos)[None]
        return allowed[:, None]  # [B, 1, T, S]


@contextlib.contextmanager
def weightless():
    """Modules built on the meta device without their random init, for weights that come from a checkpoint: the
    first init run on meta imports torch's Python reference kernels, ~1 s of every verified export."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        with torch.device("meta"):
            yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


def build_model(bundle: ModelBundle, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Decoder:
    """The reference model with the bundle's weights, read one tensor at a time."""
    cfg = bundle.config
    with weightless():
        model = Decoder(cfg)
    state = {name: bundle.load(name, dtype).to(device) for name in bundle.tensors}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def init_weights(model: Decoder, seed: int = 0, std: float = 0.02) -> Decoder:
    """Fresh weights for training from scratch (normal(0, std), norms at one, residual projections scaled down)."""
    g = torch.Generator().manual_seed(seed)
    n_layers = model.config.num_layers
    for name, p in model.named_parameters():
        with torch.no_grad():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                residual = name.endswith(("o_proj.weight", "down_proj.weight", "fc2.weight"))
                scale = std / (2 * n_layers) ** 0.5 if residual else std
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model

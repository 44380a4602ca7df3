"""Two row layouts of RoPE'd projections (q/k weights and biases), per head:

- half split (HF rotate_half): channel i rotates with channel i + d/2;
- consecutive pairs (Meta/legacy MiniMind, llama.cpp's `llama` arch): channel 2i rotates with 2i + 1.

Both work on torch tensors and numpy arrays alike (reshape and swapaxes only). Which tensors are permuted for
llama.cpp is `pair_permuted_heads` (the GGUF writer and the GGUF loader share it).
"""
from __future__ import annotations


def half_to_pairs(w, heads: int):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pairs_to_half(w, heads: int):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pair_permuted_heads(name: str, cfg) -> int | None:
    """Head count of a q/k tensor (Hugging Face name) whose rows llama.cpp's arch keeps in consecutive pairs
    (the family's `gguf_permute_qk`); None for every other tensor."""
    if not cfg.fam.gguf_permute_qk:
        return None
    if ".self_attn.q_proj." in name:
        return cfg.num_heads
    if ".self_attn.k_proj." in name:
        return cfg.num_kv_heads
    return None

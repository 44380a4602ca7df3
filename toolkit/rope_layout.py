"""Two row layouts of RoPE'd projections (q/k weights and biases), per head:

- half split (HF rotate_half): channel i rotates with channel i + d/2;
- consecutive pairs (Meta/legacy MiniMind, llama.cpp's `llama` arch): channel 2i rotates with 2i + 1.

Both work on torch tensors and numpy arrays alike (reshape and swapaxes only).
"""
from __future__ import annotations


def half_to_pairs(w, heads: int):
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def pairs_to_half(w, heads: int):
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

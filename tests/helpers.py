"""Helpers for tests: random-weight models of every family, written the way transformers or MiniMind write them."""
from __future__ import annotations

import torch

from toolkit.core.arch import ArchConfig
from toolkit.core.bundle import ModelBundle
from toolkit.core.model import Decoder, init_weights
from toolkit.core.tokenizer import Tokenizer

_TOKENIZER = None


def tiny_tokenizer() -> Tokenizer:
    global _TOKENIZER
    if _TOKENIZER is None:
        text = ["def function(self, value):\n    return value + 1\n" * 20, "The quick brown fox. " * 30]
        _TOKENIZER = Tokenizer.train_bpe(text, 320)
    return _TOKENIZER


MOE = dict(intermediate_size=0, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def tiny_config(family: str, **kw) -> ArchConfig:
    base = dict(family=family, vocab_size=320, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=96, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
                tie_word_embeddings=False)
    if family in ("qwen3_moe", "qwen2_moe", "minimind2_moe"):
        base.update(MOE)
    if family in ("qwen2_moe", "minimind2_moe"):
        base["shared_expert_intermediate_size"] = 48
    if family == "nanochat":
        base["logit_softcap"] = 15.0
    base.update(kw)
    return ArchConfig(**base).validate()


def random_weights(cfg: ArchConfig, seed: int = 0, std: float = 0.15) -> dict[str, torch.Tensor]:
    """Weights with randomised norms and biases, large enough that layout mistakes change the logits."""
    model = init_weights(Decoder(cfg), seed=seed, std=std)
    g = torch.Generator().manual_seed(seed + 1)
    state = {}
    for name, t in model.state_dict().items():
        if name not in cfg.expected_shapes():
            continue
        if "norm" in name:
            t = 1 + 0.3 * torch.randn(t.shape, generator=g)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(t.shape, generator=g)
        state[name] = t.clone()
    return state


def random_bundle(family: str, seed: int = 0, std: float = 0.15, **kw) -> ModelBundle:
    cfg = tiny_config(family, **kw)
    return ModelBundle.from_tensors(cfg, random_weights(cfg, seed, std), tiny_tokenizer()).check()

"""The reference model for verification, streamed: each module's weights are read from the bundle just before it
runs and dropped right after, so checking an artifact holds one matrix in float32 beside the runtime under test,
not a second full copy of the model (a 413M bf16 model's verified GGUF export peaked at 2.9 GB with that copy;
docs/BENCHMARKS.md, issue 22).

The model is the same `Decoder` as `build_model`'s, with the same arithmetic (float32 weights read from the same
tensors): only when the weights exist differs. Each call reads the whole checkpoint once, so it fits a verifier
that runs the model once or a few times on a whole sequence; a caller stepping through a KV cache token by token
(or an MoE model, whose near-tie routing reruns the model many times) uses `build_model`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.bundle import ModelBundle
from toolkit.core.model import Decoder, build_model, weightless


# the head's rows converted to float32 at a time: a 128K vocabulary's head is 1 GB in float32
HEAD_ROWS = 16384


def _units(model: Decoder) -> list[tuple[str, nn.Module]]:
    """The modules that hold weights themselves (each projection and norm), with their names' prefixes in the
    checkpoint; the embedding and the head are streamed their own ways (`_stream_embedding`, `_stream_head`)."""
    special = (model.model.embed_tokens, model.lm_head)
    return [(f"{path}.", module) for path, module in model.named_modules()
            if next(module.parameters(recurse=False), None) is not None and module not in special]


def _stream(unit: nn.Module, prefix: str, bundle: ModelBundle, dtype: torch.dtype) -> None:
    """Hooks that give `unit` its own weights for the length of one forward call."""
    slots = [(name, f"{prefix}{name}", param) for name, param in unit.named_parameters(recurse=False)]

    def load(module, _args):
        for name, full, _ in slots:
            module._parameters[name] = nn.Parameter(bundle.load(full, dtype), requires_grad=False)

    def drop(module, _args, _output):
        for name, _, placeholder in slots:
            module._parameters[name] = placeholder

    unit.register_forward_pre_hook(load)
    unit.register_forward_hook(drop)


def _stream_embedding(embedding: nn.Embedding, bundle: ModelBundle, dtype: torch.dtype) -> None:
    """The table in its stored precision and only the looked-up rows converted (exact: the same numbers as a
    converted table gives)."""
    placeholder = embedding.weight

    def load(module, _args):
        module._parameters["weight"] = nn.Parameter(bundle.load("model.embed_tokens.weight"), requires_grad=False)

    def drop(module, _args, output):
        module._parameters["weight"] = placeholder
        return output.to(dtype)

    embedding.register_forward_pre_hook(load)
    embedding.register_forward_hook(drop)


def _stream_head(head: nn.Linear, name: str, bundle: ModelBundle, dtype: torch.dtype) -> None:
    """The head's matrix in its stored precision, HEAD_ROWS output rows converted and multiplied at a time."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight = bundle.load(name)
        out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=dtype)
        for start in range(0, weight.shape[0], HEAD_ROWS):
            out[..., start:start + HEAD_ROWS] = F.linear(x, weight[start:start + HEAD_ROWS].to(dtype))
        return out

    head.forward = forward


def reference_model(bundle: ModelBundle, dtype: torch.dtype = torch.float32) -> Decoder:
    """The reference model for a verifier that runs it on whole sequences: streamed for dense models, whole
    (`build_model`) for MoE models (see the module's docstring)."""
    cfg = bundle.config
    if cfg.fam.moe:
        return build_model(bundle, dtype)
    with weightless():
        model = Decoder(cfg)
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    if expected != set(bundle.tensors):
        return build_model(bundle, dtype)  # strict loading names what is missing or unexpected
    for prefix, unit in _units(model):
        _stream(unit, prefix, bundle, dtype)
    _stream_embedding(model.model.embed_tokens, bundle, dtype)
    _stream_head(model.lm_head, "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight", bundle,
                 dtype)
    return model.eval()

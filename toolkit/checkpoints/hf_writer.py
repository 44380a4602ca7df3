"""Save any bundle as a Hugging Face directory that transformers loads into the class computing it exactly.

Tensors are streamed into shards (one shard in memory at a time). MiniMind2-MoE has no class of its own in
transformers; it is written as Qwen2-MoE with zero q/k/v biases, a zero shared-expert gate (sigmoid(0) = 0.5) and the
shared expert's down projection doubled, which together compute the un-gated shared expert exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from toolkit.core.arch import config_to_hf
from toolkit.core.bundle import ModelBundle

MAX_SHARD_BYTES = 2 * 1024**3


def hf_tensors(bundle: ModelBundle, dtype: torch.dtype | None = None,
               replace: dict[str, dict[str, torch.Tensor]] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """The bundle's tensors as the Hugging Face class names them, one at a time. `replace` maps a weight name to
    the tensors written in its place (quantized forms: `P.weight` -> `P.qweight`, `P.scales`, ...)."""
    cfg = bundle.config
    as_qwen2_moe = cfg.family == "minimind2_moe"
    replace = replace or {}
    for name in bundle.tensors:
        if name in replace:
            prefix = name.removesuffix("weight")
            for part, t in replace[name].items():
                yield prefix + part, t.contiguous()
            continue
        t = bundle.load(name, dtype)
        if as_qwen2_moe and name.endswith("mlp.shared_expert.down_proj.weight"):
            t = t * 2
        yield name, t.contiguous()
        if as_qwen2_moe and name.endswith("self_attn.v_proj.weight"):
            prefix = name[: -len("v_proj.weight")]
            q_rows = cfg.num_heads * cfg.head_dim
            yield prefix + "q_proj.bias", torch.zeros(q_rows, dtype=t.dtype)
            yield prefix + "k_proj.bias", torch.zeros(t.shape[0], dtype=t.dtype)
            yield prefix + "v_proj.bias", torch.zeros(t.shape[0], dtype=t.dtype)
        if as_qwen2_moe and name.endswith("mlp.gate.weight"):
            yield name[: -len("gate.weight")] + "shared_expert_gate.weight", torch.zeros(1, cfg.hidden_size,
                                                                                     dtype=t.dtype)


def save_hf(bundle: ModelBundle, out: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES, replace: dict[str, dict[str, torch.Tensor]] | None = None
            ) -> list[str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    current: dict[str, torch.Tensor] = {}
    size = 0
    written: list[str] = []
    weight_map: dict[str, int] = {}

    def flush() -> None:
        nonlocal current, size
        if current:
            idx = len(written)
            file = out / f"model-{idx + 1:05d}.safetensors"
            save_file(current, str(file), metadata={"format": "pt"})
            file.chmod(0o644)  # safetensors creates files private to the owner; a model folder is meant to be shared
            written.append(file.name)
            weight_map.update({n: idx for n in current})
            current, size = {}, 0

    out_dtype = dtype or bundle.tensors["model.embed_tokens.weight"].dtype  # quantized parts are int32/int8
    for name, t in hf_tensors(bundle, dtype, replace):
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        current[name] = t
        size += nbytes
    flush()
    if len(written) == 1:
        (out / written[0]).rename(out / "model.safetensors")
        written = ["model.safetensors"]
    else:
        total = sum((out / f).stat().st_size for f in written)
        names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
        for old, new in zip(written, names):
            (out / old).rename(out / new)
        index = {"metadata": {"total_size": total}, "weight_map": {n: names[i] for n, i in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written = names
    cfg = config_to_hf(bundle.config)
    cfg["torch_dtype"] = str(out_dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": bundle.config.bos_token_id, "eos_token_id": bundle.tokenizer.end_of_turn_ids() or None,
           "pad_token_id": bundle.config.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    bundle.tokenizer.save(out)
    return written

"""Hugging Face directories: config.json + *.safetensors (sharded or not; pytorch_model*.bin read weights-only) +
tokenizer files. Also what `toolkit train` writes."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from toolkit.checkpoints.sources import load_torch_state, refs_from_state, safetensors_refs
from toolkit.core.arch import HF_MODEL_TYPES, config_from_hf
from toolkit.core.bundle import ModelBundle, TensorRef
from toolkit.core.errors import ToolkitError
from toolkit.core.tokenizer import Tokenizer


def detect(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load(path: Path, overrides: dict[str, Any]) -> ModelBundle:
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise ToolkitError(f"cannot parse {path / 'config.json'}: {e}", "fix the JSON") from None
    if "arch" in overrides:
        wanted = overrides["arch"]
        model_type = {v: k for k, v in HF_MODEL_TYPES.items()}.get(wanted)
        if model_type is None:
            raise ToolkitError(f"unknown architecture '{wanted}' for a Hugging Face config",
                               f"choose one of: {', '.join(HF_MODEL_TYPES.values())}")
        cfg = {**cfg, "model_type": model_type}
    config = config_from_hf(cfg)
    refs = _weights(path)
    refs = _unfuse_experts(refs)
    quantization = cfg.get("quantization_config")
    raw_parts: dict = {}
    if quantization:
        from toolkit.core.quantized import dequantized_refs

        refs, raw_parts = dequantized_refs(refs, quantization, path)
    if config.tie_word_embeddings:
        refs.pop("lm_head.weight", None)
    elif "lm_head.weight" not in refs and "model.embed_tokens.weight" in refs:
        config.tie_word_embeddings = True  # head omitted: transformers ties it
    for name in [n for n in refs if n.endswith("rotary_emb.inv_freq")]:
        refs.pop(name)
    tok_dir = Path(overrides.get("tokenizer", path))
    tokenizer = Tokenizer.from_dir(tok_dir)
    provenance = {"format": "hf", "path": str(path)}
    if quantization:
        provenance["quantization"] = quantization
    return ModelBundle(config, refs, tokenizer, provenance, quantized_parts=raw_parts)


def _weights(path: Path) -> dict[str, TensorRef]:
    st = sorted(path.glob("*.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ToolkitError(f"cannot read {index}: {e}", "the shard index is damaged") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ToolkitError(f"shard {missing[0]} listed in {index.name} is missing", "download every shard")
        st = [path / f for f in files]
    refs: dict[str, TensorRef] = {}
    if st:
        for f in st:
            refs.update(safetensors_refs(f))
        return refs
    bins = sorted(path.glob("pytorch_model*.bin"))
    for f in bins:
        refs.update(refs_from_state(load_torch_state(f)))
    if not refs:
        raise ToolkitError(f"no weights in {path}", "expected model.safetensors (or shards) beside config.json")
    return refs


def _unfuse_experts(refs: dict[str, TensorRef]) -> dict[str, TensorRef]:
    """transformers 5 keeps experts fused ([E, 2I, H] gate_up, [E, H, I] down); the bundle names them one by one."""
    out: dict[str, TensorRef] = {}
    for name, ref in refs.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            E, two_i, H = ref.shape
            inter = two_i // 2
            for e in range(E):
                base = name[: -len("gate_up_proj")] + f"{e}."
                out[base + "gate_proj.weight"] = ref.derive(lambda t, e=e: t[e, :inter].contiguous(), (inter, H),
                                                            base + "gate_proj.weight")
                out[base + "up_proj.weight"] = ref.derive(lambda t, e=e: t[e, inter:].contiguous(), (inter, H),
                                                          base + "up_proj.weight")
        elif name.endswith("mlp.experts.down_proj"):
            E, H, inter = ref.shape
            for e in range(E):
                n = name[: -len("down_proj")] + f"{e}.down_proj.weight"
                out[n] = ref.derive(lambda t, e=e: t[e].contiguous(), (H, inter), n)
        else:
            out[name] = ref
    return out



"""MiniMind `.pth` state dicts of all three eras, dense and MoE, detected from keys and shapes.

| era | keys | RoPE | dtype | family |
| L (legacy) | tok_embeddings, layers.N.attention.wq, feed_forward.w1/w2/w3 | interleaved pairs | fp32 | llama / minimind2_moe |
| M2 (MiniMind2) | HF names | rotate_half | fp16 | llama / minimind2_moe |
| M3 (minimind-3) | HF names + self_attn.q_norm/k_norm | rotate_half | fp16 | qwen3 / qwen3_moe |

Legacy q/k rows are permuted from interleaved pairs to the half-split layout HF uses. What the weights cannot tell
(the head count of L/M2, the MoE top-k) comes from `--config FILE` or flags, or the load is refused with a hint.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.checkpoints.sources import load_torch_state, refs_from_state
from toolkit.core.arch import ArchConfig, family
from toolkit.core.bundle import ModelBundle, TensorRef
from toolkit.core.errors import ToolkitError
from toolkit.core.rope_layout import pairs_to_half
from toolkit.core.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

ERA_DEFAULTS = {  # from MiniMind's config classes of each era
    "L": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 8192},
    "M2": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 32768},
    "M3": {"rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 32768},
}
CONFIG_ALIASES = {  # MiniMind / Meta names -> ours
    "num_attention_heads": "num_heads", "n_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
    "n_kv_heads": "num_kv_heads", "norm_eps": "rms_norm_eps", "rms_norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "max_position_embeddings": "max_position_embeddings",
    "max_seq_len": "max_position_embeddings", "num_experts_per_tok": "experts_per_tok",
    "norm_topk_prob": "norm_topk_prob",
}
LEGACY_NAMES = [  # legacy key pattern -> HF name
    (r"^tok_embeddings\.weight$", "model.embed_tokens.weight"),
    (r"^norm\.weight$", "model.norm.weight"),
    (r"^output\.weight$", "lm_head.weight"),
    (r"^layers\.(\d+)\.attention\.wq\.weight$", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wk\.weight$", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wv\.weight$", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"^layers\.(\d+)\.attention\.wo\.weight$", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"^layers\.(\d+)\.attention_norm\.weight$", r"model.layers.\1.input_layernorm.weight"),
    (r"^layers\.(\d+)\.ffn_norm\.weight$", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"^layers\.(\d+)\.feed_forward\.gate\.weight$", r"model.layers.\1.mlp.gate.weight"),
    (r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.w1\.weight$", r"model.layers.\1.mlp.experts.\2.gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.w2\.weight$", r"model.layers.\1.mlp.experts.\2.down_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.experts\.(\d+)\.w3\.weight$", r"model.layers.\1.mlp.experts.\2.up_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.shared_experts\.w1\.weight$", r"model.layers.\1.mlp.shared_experts.0.gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.shared_experts\.w2\.weight$", r"model.layers.\1.mlp.shared_experts.0.down_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.shared_experts\.w3\.weight$", r"model.layers.\1.mlp.shared_experts.0.up_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w1\.weight$", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w2\.weight$", r"model.layers.\1.mlp.down_proj.weight"),
    (r"^layers\.(\d+)\.feed_forward\.w3\.weight$", r"model.layers.\1.mlp.up_proj.weight"),
]


def detect(path: Path) -> bool:
    return path.is_file() and path.suffix in (".pth", ".pt", ".bin")


def load(path: Path, overrides: dict[str, Any]) -> ModelBundle:
    state = load_torch_state(path)
    era = _era(state)
    if era == "L":
        state = _rename_legacy(state)
    opts = {**ERA_DEFAULTS[era], **_config_file(overrides.get("config")),
            **{k: overrides[k] for k in ("num_heads", "experts_per_tok") if k in overrides}}
    config, refs = _infer(state, era, opts, path)
    if "arch" in overrides and overrides["arch"] != config.family:
        config.family = family(overrides["arch"]).name  # refuses unknown names; check() refuses wrong tensors
    tokenizer = _tokenizer(path, overrides)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    return ModelBundle(config, refs, tokenizer, {"format": "minimind", "era": era, "path": str(path)})


def _era(state: dict[str, torch.Tensor]) -> str:
    if "tok_embeddings.weight" in state:
        return "L"
    if "model.embed_tokens.weight" not in state:
        raise ToolkitError("unknown architecture: the state dict has neither MiniMind's 'tok_embeddings' nor "
                           "'model.embed_tokens' keys", "pass a MiniMind .pth or a Hugging Face directory")
    return "M3" if any(k.endswith("self_attn.q_norm.weight") for k in state) else "M2"


def _rename_legacy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for pattern, repl in LEGACY_NAMES:
            if re.match(pattern, key):
                out[re.sub(pattern, repl, key)] = value
                break
        else:
            raise ToolkitError(f"unknown key '{key}' in a legacy MiniMind checkpoint", "is it a MiniMind model?")
    return out


def _config_file(file: str | None) -> dict[str, Any]:
    if not file:
        return {}
    try:
        raw = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ToolkitError(f"cannot read --config {file}: {e}", "pass a JSON file with the model's config") from None
    if not isinstance(raw, dict):
        raise ToolkitError(f"--config {file} is not a JSON object", "pass a JSON object of config keys")
    out = {CONFIG_ALIASES[k]: v for k, v in raw.items() if k in CONFIG_ALIASES and v is not None}
    for key, value in out.items():
        if key != "norm_topk_prob" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ToolkitError(f"--config {file}: {key} must be a number, got {value!r}", "fix the value")
    if "rope_theta" not in out and isinstance(raw.get("rope_parameters"), dict):
        out["rope_theta"] = raw["rope_parameters"].get("rope_theta", 1e6)
    if raw.get("inference_rope_scaling") or raw.get("rope_scaling"):
        raise ToolkitError("rope_scaling (YaRN) is not supported; computing without it would give wrong numbers",
                           "set inference_rope_scaling to false in --config")
    return out


def _infer(state: dict[str, torch.Tensor], era: str, opts: dict[str, Any],
           path: Path) -> tuple[ArchConfig, dict[str, TensorRef]]:
    import torch

    needed = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"]
    missing = [k for k in needed if k not in state]
    if missing:
        raise ToolkitError(f"{path.name} lacks {missing[0]}: not a complete MiniMind checkpoint",
                           "pass the .pth saved by MiniMind's trainer")
    embed = state["model.embed_tokens.weight"]
    vocab, hidden = embed.shape
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"model\.layers\.(\d+)\.", k)))
    q_rows = state["model.layers.0.self_attn.q_proj.weight"].shape[0]
    kv_rows = state["model.layers.0.self_attn.k_proj.weight"].shape[0]
    if era == "M3":
        head_dim = state["model.layers.0.self_attn.q_norm.weight"].shape[0]
        num_heads = q_rows // head_dim
    else:
        if "num_heads" not in opts:
            raise ToolkitError(f"{path.name}: a MiniMind{'2' if era == 'M2' else ' legacy'} checkpoint does not "
                               "record its attention head count",
                               "pass --num-heads 8 (every released MiniMind2 model uses 8) or --config FILE")
        num_heads = int(opts["num_heads"])
        if num_heads <= 0 or q_rows % num_heads:
            raise ToolkitError(f"{num_heads} attention heads do not divide the query width {q_rows}",
                               "pass the head count the model was trained with (--num-heads)")
        head_dim = q_rows // num_heads
    if kv_rows % head_dim:
        raise ToolkitError(f"key width {kv_rows} is not a multiple of head_dim {head_dim}",
                           "check --num-heads against the checkpoint")
    num_kv = kv_rows // head_dim
    if num_heads % num_kv:
        raise ToolkitError(f"{num_heads} heads cannot be shared by {num_kv} key/value heads",
                           "check --num-heads against the checkpoint")
    moe = any(".mlp.experts." in k for k in state)
    shared = [k for k in state if ".mlp.shared_experts." in k]
    family = {("M3", False): "qwen3", ("M3", True): "qwen3_moe"}.get((era, moe), "minimind2_moe" if moe else "llama")
    cfg = ArchConfig(family=family, vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=num_heads,
                     num_kv_heads=num_kv, head_dim=head_dim, intermediate_size=0,
                     rms_norm_eps=float(opts["rms_norm_eps"]), rope_theta=float(opts["rope_theta"]),
                     max_position_embeddings=int(opts["max_position_embeddings"]))
    cfg.extra["minimind_era"] = era
    if era == "L":  # interleaved-pair RoPE -> HF half split
        for i in range(layers):
            for name, heads in (("q_proj", num_heads), ("k_proj", num_kv)):
                key = f"model.layers.{i}.self_attn.{name}.weight"
                state[key] = pairs_to_half(state[key], heads)
    if not moe:
        cfg.intermediate_size = state["model.layers.0.mlp.gate_proj.weight"].shape[0]
    else:
        cfg.num_experts = 1 + max(int(m.group(1)) for k in state if (m := re.search(r"\.mlp\.experts\.(\d+)\.", k)))
        cfg.moe_intermediate_size = state["model.layers.0.mlp.experts.0.gate_proj.weight"].shape[0]
        if "experts_per_tok" not in opts:
            default = 2 if era != "M3" else 1
            raise ToolkitError(f"{path.name}: a MoE checkpoint does not record how many experts each token uses",
                               f"pass --experts-per-tok N (MiniMind's default for this era is {default}) or "
                               "--config FILE")
        cfg.num_experts_per_tok = int(opts["experts_per_tok"])
        norm = bool(opts.get("norm_topk_prob", True))
        # MiniMind2 renormalises only when top_k > 1; minimind-3 (Qwen3-MoE) always when norm_topk_prob
        cfg.norm_topk_prob = norm and (era == "M3" or cfg.num_experts_per_tok > 1)
        if shared:
            state = _merge_shared_experts(state, layers)
            cfg.shared_expert_intermediate_size = state["model.layers.0.mlp.shared_expert.gate_proj.weight"].shape[0]
    head = state.pop("lm_head.weight", None)
    cfg.tie_word_embeddings = head is None or torch.equal(head, embed)
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = head
    return cfg, refs_from_state(state)


def _merge_shared_experts(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Several un-gated shared experts summed = one MLP with their intermediate channels concatenated (exact)."""
    import torch

    out = {k: v for k, v in state.items() if ".mlp.shared_experts." not in k}
    for i in range(layers):
        p = f"model.layers.{i}.mlp."
        ids = sorted({int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"shared_experts\.(\d+)\.", k))})
        if not ids:
            continue
        out[p + "shared_expert.gate_proj.weight"] = torch.cat([state[f"{p}shared_experts.{e}.gate_proj.weight"]
                                                               for e in ids], 0)
        out[p + "shared_expert.up_proj.weight"] = torch.cat([state[f"{p}shared_experts.{e}.up_proj.weight"]
                                                             for e in ids], 0)
        out[p + "shared_expert.down_proj.weight"] = torch.cat([state[f"{p}shared_experts.{e}.down_proj.weight"]
                                                               for e in ids], 1)
    return out


def _tokenizer(path: Path, overrides: dict[str, Any]) -> Tokenizer:
    if "tokenizer" in overrides:
        return Tokenizer.from_dir(overrides["tokenizer"])
    if (path.parent / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path.parent)
    raise ToolkitError(f"no tokenizer for {path.name}: a .pth holds weights only",
                       "pass --tokenizer DIR with the tokenizer.json of the model's era (MiniMind's model/ folder)")



"""The one table of architecture facts.

Every family the toolkit computes is a row of FAMILIES: which transformers class computes it, what its attention and
MLP look like, and how llama.cpp names it. Loaders, the reference model, the Hugging Face writer and the exporters read
these facts from here instead of branching on family names of their own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from toolkit.core import rope
from toolkit.core.errors import ToolkitError


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    hf_architecture: str  # transformers class that computes this family exactly
    hf_model_type: str
    qkv_bias: bool  # biases on q/k/v projections (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    moe: bool
    shared_expert: bool = False  # one always-on expert beside the routed ones
    shared_expert_gated: bool = False  # shared expert scaled by sigmoid(x . w) (Qwen2-MoE); un-gated in MiniMind2
    gguf_arch: str | None = None  # llama.cpp architecture that computes it identically (None: not decided)
    gguf_permute_qk: bool = False  # llama.cpp's `llama` arch rotates interleaved pairs: q/k rows are permuted
    gguf_refusal: str = ""  # why no llama.cpp architecture computes it, for the error of `export gguf`
    mlp: str = "swiglu"  # "swiglu": down(silu(gate(x)) * up(x)); "relu2": fc2(relu(fc1(x))^2), no gate (NanoChat)
    norm_weights: bool = True  # False: every RMSNorm (QK-norm included) is weightless, x / rms(x)
    embed_norm: bool = False  # an RMSNorm right after the token embedding
    rope_sign: int = 1  # -1: queries/keys rotate by -theta (NanoChat), i.e. sin negated
    mnn_engine_refusal: str = ""  # why MNN's LLM engine (llmexport's graph) cannot compute it, for `export mnn`


# Qwen2-MoE as transformers saves it (MiniMind2-MoE too): llmexport 0.0.5 maps only Qwen3-MoE's experts
QWEN2_MOE_ENGINE = ("MNN's exporter (llmexport 0.0.5) maps the experts of Qwen3-MoE only, not Qwen2-MoE's gated "
                    "shared expert")

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", "Llama / MiniMind2 dense", "LlamaForCausalLM", "llama", False, False, False,
               gguf_arch="llama", gguf_permute_qk=True),
        Family("qwen2", "Qwen2 / Qwen2.5 (q/k/v biases)", "Qwen2ForCausalLM", "qwen2", True, False, False,
               gguf_arch="qwen2"),
        Family("qwen3", "Qwen3 / minimind-3 dense (per-head QK RMSNorm)", "Qwen3ForCausalLM", "qwen3", False, True,
               False, gguf_arch="qwen3"),
        Family("qwen3_moe", "Qwen3-MoE / minimind-3 MoE (softmax top-k, no shared expert)", "Qwen3MoeForCausalLM",
               "qwen3_moe", False, True, True, gguf_arch="qwen3moe"),
        Family("qwen2_moe", "Qwen2-MoE (softmax top-k + sigmoid-gated shared expert)", "Qwen2MoeForCausalLM",
               "qwen2_moe", True, False, True, shared_expert=True, shared_expert_gated=True, gguf_arch="qwen2moe",
               mnn_engine_refusal=QWEN2_MOE_ENGINE),
        # MiniMind2-MoE: top-k renormalised + one un-gated shared expert. Not llama.cpp's qwen2moe: it never
        # renormalises, and the exact Qwen2-MoE form (zero shared gate) gives NaN in llama.cpp (measured).
        # Saved as Qwen2-MoE for transformers (see hf_writer): zero
        # q/k/v biases, a zero shared-expert gate (sigmoid(0) = 0.5) and the shared down projection doubled, all
        # exact in floating point.
        # In GGUF it is llama.cpp's `granitemoe` with every Granite multiplier at 1 (attention scale 1/sqrt(hd)):
        # softmax over the top-k router logits (= top-k of the softmax, renormalised), plus an un-gated shared
        # expert, and llama's pair-wise RoPE (q/k rows permuted).
        Family("minimind2_moe", "MiniMind2 MoE (top-k renormalised + un-gated shared expert)",
               "Qwen2MoeForCausalLM", "qwen2_moe", False, False, True, shared_expert=True, gguf_arch="granitemoe",
               gguf_permute_qk=True, mnn_engine_refusal=QWEN2_MOE_ENGINE),
        # NanoChat (karpathy/nanochat) era A: the original release, and what transformers' NanoChat computes.
        # Weightless QK-norm commutes with the rotation, so norm-then-RoPE equals nanochat's RoPE-then-norm.
        Family("nanochat", "NanoChat era A (ReLU² MLP, weightless RMSNorms incl. after the embedding, QK-norm, "
                           "RoPE by -theta, softcapped logits)", "NanoChatForCausalLM", "nanochat", False, True, False,
               mlp="relu2", norm_weights=False, embed_norm=True, rope_sign=-1,
               gguf_refusal="llama.cpp has no architecture that computes NanoChat: none combines an un-gated "
                            "ReLU² MLP, weightless RMSNorms with one after the token embedding, and tanh-softcapped "
                            "logits (gemma2 softcaps but uses GELU and weighted norms; no upstream arch has ReLU²)",
               mnn_engine_refusal="MNN's exporter (llmexport 0.0.5) has no NanoChat mapping, and its graph has "
                                  "gated MLPs and weighted norms only: no ReLU², no weightless RMSNorm after the "
                                  "embedding, no logit softcap"),
    )
}

# NanoChat's F.rms_norm(x, (C,)) passes eps=None: torch.finfo(float32).eps
NANOCHAT_EPS = 1.1920928955078125e-07

# transformers model_type -> family (what a Hugging Face directory's config.json says)
HF_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe",
                  "qwen2_moe": "qwen2_moe", "nanochat": "nanochat"}


def family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ToolkitError(f"unknown architecture '{name}'",
                           f"supported architectures: {', '.join(FAMILIES)}") from None


@dataclass
class ArchConfig:
    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    # RoPE scaling as transformers' rope_parameters hold it, without rope_theta: {"rope_type": "llama3" | "linear" |
    # "yarn" | "dynamic", its parameters...}; None for plain RoPE (toolkit/core/rope.py computes it)
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    # mixture of experts (zero when dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    shared_expert_intermediate_size: int = 0
    logit_softcap: float = 0.0  # > 0: logits = c * tanh(logits / c) (NanoChat: 15)
    extra: dict[str, Any] = field(default_factory=dict)  # provenance of choices, never read by the math

    @property
    def fam(self) -> Family:
        return family(self.family)

    def validate(self) -> "ArchConfig":
        fam = self.fam
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size"):
            if getattr(self, name) <= 0 and not (name == "intermediate_size" and fam.moe):
                raise ToolkitError(f"{name} must be positive, got {getattr(self, name)}",
                                   "check the model's config")
        if self.num_heads % self.num_kv_heads:
            raise ToolkitError(
                f"{self.num_heads} attention heads cannot be shared by {self.num_kv_heads} key/value heads",
                "num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ToolkitError(f"head_dim {self.head_dim} is odd; RoPE rotates pairs of channels",
                               "check num_attention_heads against hidden_size")
        self.rope_scaling = rope.check_scaling(self.rope_scaling)
        if fam.moe:
            if self.num_experts <= 0 or self.moe_intermediate_size <= 0:
                raise ToolkitError("a mixture-of-experts model needs num_experts and moe_intermediate_size",
                                   "check the model's config")
            if not 0 < self.num_experts_per_tok <= self.num_experts:
                raise ToolkitError(
                    f"num_experts_per_tok must be in 1..{self.num_experts}, got {self.num_experts_per_tok}",
                    "pass --experts-per-tok or set num_experts_per_tok in --config")
            if fam.shared_expert and self.shared_expert_intermediate_size <= 0:
                raise ToolkitError("this family needs shared_expert_intermediate_size", "check the model's config")
        return self

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the family in Hugging Face naming with its shape."""
        fam, H = self.fam, self.hidden_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, H)}
        if fam.norm_weights:
            shapes["model.norm.weight"] = (H,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, H)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            if fam.norm_weights:
                shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,)})
            shapes.update({p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                           p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q)})
            if fam.qkv_bias:
                shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                               p + "self_attn.v_proj.bias": (kv,)})
            if fam.qk_norm and fam.norm_weights:
                shapes.update({p + "self_attn.q_norm.weight": (self.head_dim,),
                               p + "self_attn.k_norm.weight": (self.head_dim,)})
            if fam.mlp == "relu2":
                shapes.update({p + "mlp.fc1.weight": (self.intermediate_size, H),
                               p + "mlp.fc2.weight": (H, self.intermediate_size)})
                continue
            if not fam.moe:
                shapes.update(_mlp_shapes(p + "mlp.", H, self.intermediate_size))
                continue
            shapes[p + "mlp.gate.weight"] = (self.num_experts, H)
            for e in range(self.num_experts):
                shapes.update(_mlp_shapes(f"{p}mlp.experts.{e}.", H, self.moe_intermediate_size))
            if fam.shared_expert:
                shapes.update(_mlp_shapes(p + "mlp.shared_expert.", H, self.shared_expert_intermediate_size))
                if fam.shared_expert_gated:
                    shapes[p + "mlp.shared_expert_gate.weight"] = (1, H)
        return shapes

    def num_parameters(self) -> int:
        total = 0
        for shape in self.expected_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ArchConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _mlp_shapes(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {prefix + "gate_proj.weight": (inter, hidden), prefix + "up_proj.weight": (inter, hidden),
            prefix + "down_proj.weight": (hidden, inter)}


def config_from_hf(cfg: dict[str, Any]) -> ArchConfig:
    """Read a transformers config.json into an ArchConfig, refusing what the table cannot compute."""
    if not isinstance(cfg, dict):
        raise ToolkitError("config.json is not a JSON object", "pass a Hugging Face model folder")
    try:
        return _config_from_hf(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise ToolkitError(f"config.json lacks or mistypes {e}", "compare it with the model class's config") from None


# What each transformers config class assumes for a key config.json leaves out (checked against transformers 5.23's
# classes; 4.4x's are the same). Not every class derives these from other keys: Qwen2/Qwen3 default to 32 key/value
# heads whatever num_attention_heads says, and Qwen3 to head_dim 128 whatever hidden_size says.
HF_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"max_position_embeddings": 2048, "num_key_value_heads": None, "head_dim": None},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": None},
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128},
    "qwen3_moe": {"max_position_embeddings": 32768, "num_key_value_heads": 4, "head_dim": None},
    "qwen2_moe": {"max_position_embeddings": 32768, "num_key_value_heads": 16, "head_dim": None},
    "nanochat": {"max_position_embeddings": 2048, "num_key_value_heads": None, "head_dim": None,
                 "final_logit_softcapping": 15.0},
}
# every class: rms_norm_eps 1e-6, tie_word_embeddings False, norm_topk_prob False (both MoE classes)


def _config_from_hf(cfg: dict[str, Any]) -> ArchConfig:
    model_type = cfg.get("model_type")
    fam_name = HF_MODEL_TYPES.get(model_type or "")
    if fam_name is None:
        archs = cfg.get("architectures") or []
        raise ToolkitError(f"unknown architecture: model_type '{model_type}' ({', '.join(archs) or 'no class'})",
                           "supported model types: " + ", ".join(HF_MODEL_TYPES))
    _refuse_unsupported_hf(cfg, fam_name)
    defaults = HF_CLASS_DEFAULTS[model_type]

    def given(key: str) -> Any:
        """The config's value, the class default where the key is absent; an explicit null stays null (the
        classes then derive it: head_dim and num_key_value_heads from the attention heads)."""
        return cfg[key] if key in cfg else defaults.get(key)

    H = int(cfg["hidden_size"])
    nh = int(cfg["num_attention_heads"])
    head_dim = given("head_dim")
    if not head_dim:
        if H % nh:
            raise ToolkitError(f"{nh} attention heads do not divide hidden_size {H}",
                               "fix num_attention_heads or set head_dim in config.json")
        head_dim = H // nh
    max_positions = int(given("max_position_embeddings"))
    theta, scaling = rope.scaling_from_hf(cfg, max_positions)
    fam = FAMILIES[fam_name]
    eos = cfg.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    softcap = given("final_logit_softcapping") if fam_name == "nanochat" else None
    ac = ArchConfig(
        family=fam_name, vocab_size=int(cfg["vocab_size"]), hidden_size=H, num_layers=int(cfg["num_hidden_layers"]),
        num_heads=nh, num_kv_heads=int(given("num_key_value_heads") or nh), head_dim=int(head_dim),
        intermediate_size=int(cfg.get("intermediate_size") or 0), rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, max_position_embeddings=max_positions, rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=eos, pad_token_id=cfg.get("pad_token_id"), logit_softcap=float(softcap or 0.0))
    dtype = cfg.get("dtype", cfg.get("torch_dtype"))  # transformers 5 writes dtype, 4.x torch_dtype
    if dtype:
        ac.extra["dtype"] = str(dtype).replace("torch.", "")
    if fam.moe:
        # transformers 5.23's Qwen3MoeConfig writes num_local_experts (num_experts is its alias); Qwen2-MoE and
        # transformers 4.x write num_experts
        experts = cfg.get("num_experts", cfg.get("num_local_experts"))
        if experts is None:
            raise ToolkitError("a mixture-of-experts config.json needs num_experts (or num_local_experts)",
                               "compare it with the model class's config")
        ac.num_experts = int(experts)
        ac.num_experts_per_tok = int(cfg["num_experts_per_tok"])
        ac.moe_intermediate_size = int(cfg["moe_intermediate_size"])
        ac.norm_topk_prob = bool(cfg.get("norm_topk_prob", False))  # transformers' default for both MoE configs
        if fam.shared_expert:
            ac.shared_expert_intermediate_size = int(cfg["shared_expert_intermediate_size"])
    return ac.validate()


def _refuse_unsupported_hf(cfg: dict[str, Any], fam_name: str) -> None:
    unsupported = []
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        unsupported.append("attention_bias/mlp_bias")
    if cfg.get("use_sliding_window"):  # false with a sliding_window value (Qwen2.5's configs): full attention
        unsupported.append("use_sliding_window")
    if fam_name in ("qwen2_moe", "qwen3_moe"):
        if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1)) != 1:
            unsupported.append("mlp_only_layers/decoder_sparse_step")
        if fam_name == "qwen2_moe" and not cfg.get("qkv_bias", True):
            unsupported.append("qkv_bias=false")  # the family has q/k/v biases; zero biases express their absence
    act = "relu2" if fam_name == "nanochat" else "silu"  # each class's default and only activation
    if cfg.get("hidden_act", act) != act:
        unsupported.append(f"hidden_act={cfg.get('hidden_act')}")
    if unsupported:
        raise ToolkitError(f"config uses features the toolkit does not compute: {', '.join(unsupported)}",
                           "only the features of the architecture table are supported (see `toolkit info --help`)")


def config_to_hf(ac: ArchConfig) -> dict[str, Any]:
    """config.json that transformers loads into the class computing this family exactly."""
    fam = ac.fam
    cfg: dict[str, Any] = {
        "architectures": [fam.hf_architecture], "model_type": fam.hf_model_type, "vocab_size": ac.vocab_size,
        "hidden_size": ac.hidden_size, "num_hidden_layers": ac.num_layers, "num_attention_heads": ac.num_heads,
        "num_key_value_heads": ac.num_kv_heads, "head_dim": ac.head_dim,
        "intermediate_size": ac.intermediate_size or ac.moe_intermediate_size, "hidden_act": "silu",
        "rms_norm_eps": ac.rms_norm_eps, "rope_theta": ac.rope_theta,
        "rope_parameters": rope.to_hf(ac.rope_theta, ac.rope_scaling),
        "max_position_embeddings": ac.max_position_embeddings, "tie_word_embeddings": ac.tie_word_embeddings,
        "bos_token_id": ac.bos_token_id, "eos_token_id": ac.eos_token_id, "pad_token_id": ac.pad_token_id,
        "attention_dropout": 0.0, "use_cache": True,
    }
    if ac.rope_scaling:  # transformers 4.x reads the scaling from here (5.x from rope_parameters; the two agree)
        cfg["rope_scaling"] = dict(ac.rope_scaling)
    if fam.hf_model_type == "llama":
        cfg.update(attention_bias=False, mlp_bias=False)
    if fam.hf_model_type in ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe"):
        cfg.update(use_sliding_window=False, sliding_window=None, max_window_layers=ac.num_layers)
    if fam.hf_model_type == "qwen3":
        cfg["attention_bias"] = False
    if fam.moe:
        cfg.update(num_experts=ac.num_experts, num_experts_per_tok=ac.num_experts_per_tok,
                   moe_intermediate_size=ac.moe_intermediate_size, norm_topk_prob=ac.norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=[], output_router_logits=False)
    if fam.hf_model_type == "qwen3_moe":
        cfg["attention_bias"] = False
    if fam.hf_model_type == "qwen2_moe":
        cfg.update(qkv_bias=True, shared_expert_intermediate_size=ac.shared_expert_intermediate_size)
    if ac.family == "minimind2_moe":
        cfg["toolkit_family"] = "minimind2_moe"
    if fam.hf_model_type == "nanochat":
        cfg.update(hidden_act="relu2", attention_bias=False, final_logit_softcapping=ac.logit_softcap or None)
    return cfg

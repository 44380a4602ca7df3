"""RoPE's inverse frequencies and attention scaling, computed as transformers computes them.

One function, `frequencies`, follows transformers' `modeling_rope_utils.ROPE_INIT_FUNCTIONS` (5.23) for every
rope type the toolkit supports, operation by operation in float32, so the reference model's angles equal
transformers' bit for bit with torch (and agree to the last float32 digit or so with numpy, which the GGUF writer
uses so that a conversion never needs torch). The reference model, the ONNX graphs, the MNN runtime and the GGUF
writer all take RoPE from here.

A scaling is held as transformers' `rope_parameters` without `rope_theta` (ArchConfig.rope_scaling): `rope_type`
plus that type's parameters, with `original_max_position_embeddings` filled in the way transformers fills it.

- `linear`: every inverse frequency divided by `factor` (positions interpolated).
- `llama3` (Llama 3.1/3.2): frequencies whose wavelength exceeds `original / low_freq_factor` divided by
  `factor`, those below `original / high_freq_factor` kept, the ones between smoothly interpolated.
- `yarn`: interpolated frequencies (divided by `factor`) for the low-frequency dimensions and the original ones for
  the high-frequency dimensions, mixed linearly over the correction range set by `beta_fast`/`beta_slow` (rounded
  to whole dimensions unless `truncate` is false); cos and sin are multiplied by `attention_factor` (by default
  0.1 ln(factor) + 1).
- `dynamic` (NTK): the base grows with the sequence once it passes `max_position_embeddings`: transformers
  recomputes the frequencies from each call's longest position, so they depend on the call (seq_len), not only on
  the model. Engines with frequencies fixed at load time cannot compute it.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from toolkit.core.errors import ToolkitError

DEFAULT_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta
SUPPORTED = ("linear", "dynamic", "yarn", "llama3")
# parameters each type needs besides rope_type (transformers' _validate_*_rope_parameters), then those it may have
REQUIRED = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}
OPTIONAL = {"yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate")}
# types that scale from a pretraining length: transformers fills their original_max_position_embeddings
WITH_ORIGINAL = ("llama3", "yarn", "longrope")
REFUSED = {
    "longrope": "LongRoPE (Phi-3) switches between two per-frequency factor lists by the sequence length; the "
                "architecture table's families do not use it",
    "proportional": "proportional RoPE (Gemma 4) rotates only part of each head",
    "su": "'su' scaling is the old name of LongRoPE (Phi-3), which the architecture table's families do not use",
    "mrope": "multimodal RoPE (Qwen2-VL) rotates sections of each head by separate position axes",
    "axial": "axial RoPE rotates by 2-D image positions",
}
DYNAMIC_WHY = ("transformers' dynamic NTK scaling recomputes the RoPE frequencies from each call's longest position "
               "once it passes max_position_embeddings")


# --- reading a config ---

def scaling_from_hf(cfg: dict[str, Any], max_position_embeddings: int) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling or None) from a transformers config.json of any 4.4x-5.2x form: `rope_theta` +
    `rope_scaling` (with `type` or `rope_type`), or `rope_parameters`. As transformers 5 reads them: `rope_scaling`
    wins over `rope_parameters`, a theta inside the dict over the top-level one, `rope_type` over `type`, and a
    top-level `original_max_position_embeddings` over the dict's (Phi-3's convention, kept for every model)."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ToolkitError(f"rope_scaling/rope_parameters is {type(params).__name__}, not an object",
                           "write it as transformers does, e.g. {\"rope_type\": \"linear\", \"factor\": 2.0}")
    if params and all(isinstance(v, dict) or v is None for v in params.values()):
        raise ToolkitError("RoPE parameters differ per layer type (" + ", ".join(params) + ")",
                           "per-layer RoPE is not part of the architecture table's families")
    theta = params.get("rope_theta", cfg.get("rope_theta", DEFAULT_THETA))
    if theta is None:
        theta = DEFAULT_THETA
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ToolkitError(f"partial_rotary_factor {partial}: RoPE on part of each head is not supported",
                           "the architecture table's families rotate whole heads")
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return float(theta), None
    scaling = {"rope_type": kind, **{k: params[k] for k in (*REQUIRED.get(kind, ()), *OPTIONAL.get(kind, ()))
                                     if k in params}}
    if kind in WITH_ORIGINAL:
        if "original_max_position_embeddings" in cfg:
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        scaling.setdefault("original_max_position_embeddings", max_position_embeddings)
    if kind == "yarn" and scaling.get("factor", 0) is None:  # transformers: the ratio of the two context lengths
        scaling["factor"] = max_position_embeddings / scaling["original_max_position_embeddings"]
    return float(theta), check_scaling(scaling)


def check_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """The scaling with its numbers typed, or a ToolkitError saying why it cannot be computed."""
    if scaling is None:
        return None
    kind = scaling.get("rope_type")
    if kind in REFUSED:
        raise ToolkitError(f"rope_scaling '{kind}' is not supported: {REFUSED[kind]}",
                           f"supported RoPE scaling types: {', '.join(SUPPORTED)}")
    if kind not in SUPPORTED:
        raise ToolkitError(f"rope_scaling '{kind}' is not supported; computing without it would give wrong numbers",
                           f"supported RoPE scaling types: {', '.join(SUPPORTED)}")
    missing = [k for k in REQUIRED[kind] if scaling.get(k) is None]
    if missing:
        raise ToolkitError(f"rope_scaling '{kind}' lacks {', '.join(missing)}",
                           f"transformers needs {', '.join(REQUIRED[kind])} for '{kind}'")
    out: dict[str, Any] = {"rope_type": kind}
    try:
        for k in (*REQUIRED[kind], *OPTIONAL.get(kind, ())):
            v = scaling.get(k)
            if v is None:
                continue
            if k == "original_max_position_embeddings":
                out[k] = int(v)
            elif k == "truncate":
                out[k] = bool(v)
            else:
                out[k] = float(v)
    except (TypeError, ValueError):
        raise ToolkitError(f"rope_scaling '{kind}' has a non-numeric parameter ({scaling})",
                           "write its parameters as numbers") from None
    if out["factor"] <= 0:
        raise ToolkitError(f"rope_scaling factor {out['factor']} must be positive", "check rope_scaling.factor")
    if kind == "llama3" and out["high_freq_factor"] <= out["low_freq_factor"]:
        raise ToolkitError("rope_scaling 'llama3' needs high_freq_factor > low_freq_factor",
                           "check the config's rope_scaling (Llama 3.1: low 1, high 4)")
    return out


def to_hf(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """transformers 5's `rope_parameters` for this RoPE."""
    return {"rope_theta": theta, "rope_type": "default"} if scaling is None else {"rope_theta": theta, **scaling}


# --- the frequencies ---

def _f32(a):
    return a.float() if hasattr(a, "float") else a.astype(np.float32)


def _default(xp, dim: int, base):
    # transformers: 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return 1.0 / (base ** (_f32(xp.arange(0, dim, 2)) / dim))


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(scaling: dict[str, Any]) -> float:
    """What yarn multiplies cos and sin by: attention_factor, else from factor (and mscale/mscale_all_dim)."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor, m, m_all = scaling["factor"], scaling.get("mscale"), scaling.get("mscale_all_dim")
    if m and m_all:
        return float(_mscale(factor, m) / _mscale(factor, m_all))
    return _mscale(factor)


def yarn_correction_range(scaling: dict[str, Any], dim: int, base: float) -> tuple[float, float]:
    """The dimensions between which yarn blends interpolated into original frequencies (transformers'
    find_correction_range; rounded outward to whole dimensions unless truncate is false)."""
    def dim_for(rotations: float) -> float:
        return (dim * math.log(scaling["original_max_position_embeddings"] / (rotations * 2 * math.pi))) / (
            2 * math.log(base))

    low, high = dim_for(scaling.get("beta_fast") or 32), dim_for(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def _yarn(xp, dim: int, base: float, s: dict[str, Any]):
    pos_freqs = base ** (_f32(xp.arange(0, dim, 2)) / dim)
    extrapolated = 1.0 / pos_freqs
    interpolated = 1.0 / (s["factor"] * pos_freqs)
    low, high = yarn_correction_range(s, dim, base)
    if low == high:
        high += 0.001  # transformers: prevents a division by zero
    ramp = xp.clip((_f32(xp.arange(dim // 2)) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    return interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight


def _llama3(xp, dim: int, base: float, s: dict[str, Any]):
    inv = _default(xp, dim, base)
    factor, low_f, high_f = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    original = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = original / low_f, original / high_f
    wavelen = 2 * math.pi / inv
    scaled = xp.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (original / wavelen - low_f) / (high_f - low_f)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return xp.where(medium, smoothed, scaled)


def _dynamic(dim: int, base: float, s: dict[str, Any], max_positions: int, seq_len: int | None):
    import torch

    factor = s["factor"]
    if seq_len is None:  # at model construction: the python-float path, which leaves the base as it is
        length = max_positions
    else:  # in the forward: seq_len is a tensor there, so the base is a float32 tensor
        length = torch.maximum(torch.tensor(seq_len, dtype=torch.int64), torch.tensor(max_positions))
    base = base * ((factor * length / max_positions) - (factor - 1)) ** (dim / (dim - 2))
    return _default(torch, dim, base)


def frequencies(head_dim: int, theta: float, scaling: dict[str, Any] | None, max_position_embeddings: int,
                seq_len: int | None = None, xp=None):
    """(inv_freq [head_dim/2] float32, attention scaling) as transformers' rotary embedding holds them. `xp`:
    torch (default; exact) or numpy. `seq_len` (dynamic only): the longest position + 1 of the call."""
    if xp is None:
        import torch as xp
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "default":
        return _default(xp, head_dim, theta), 1.0
    if kind == "linear":
        return _default(xp, head_dim, theta) / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3(xp, head_dim, theta, scaling), 1.0
    if kind == "yarn":
        return _yarn(xp, head_dim, theta, scaling), yarn_attention_factor(scaling)
    if kind == "dynamic":
        if xp is np:
            raise ValueError("dynamic RoPE is computed with torch only")
        return _dynamic(head_dim, theta, scaling, max_position_embeddings, seq_len), 1.0
    raise ValueError(f"unchecked rope type {kind}")


def for_config(cfg, seq_len: int | None = None, xp=None):
    """frequencies() of an ArchConfig."""
    return frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, seq_len, xp)


def is_dynamic(cfg) -> bool:
    return bool(cfg.rope_scaling) and cfg.rope_scaling["rope_type"] == "dynamic"


def fixed_frequencies(cfg, target: str, why: str) -> tuple[np.ndarray, float]:
    """(inv_freq as float32 numpy, attention scaling) for an engine whose frequencies are fixed when it loads,
    computed with torch as the reference model computes them; dynamic scaling is refused with `why`."""
    if is_dynamic(cfg):
        raise ToolkitError(f"{target} cannot compute this model's RoPE: {DYNAMIC_WHY} "
                           f"({cfg.max_position_embeddings}), and {why}",
                           "run it with `toolkit generate CKPT` (the reference model computes dynamic scaling), or "
                           "export a model whose config uses linear, llama3 or yarn scaling")
    inv, scale = for_config(cfg)
    return inv.numpy().astype(np.float32), float(scale)


def describe(cfg) -> str:
    """One line for reports (`toolkit info`'s rope row): 'theta 500000, llama3 x32 (from 8192)'."""
    s = cfg.rope_scaling
    if not s:
        return f"theta {cfg.rope_theta:g}"
    origin = f" (from {s['original_max_position_embeddings']})" if "original_max_position_embeddings" in s else ""
    return f"theta {cfg.rope_theta:g}, {s['rope_type']} x{s['factor']:g}{origin}"

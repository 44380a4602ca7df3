"""GGUF files as input checkpoints: a model from Ollama's library, llama.cpp's converter, or a package that ships one.

The architecture comes from the file's `general.architecture` through the architecture table (the family whose
`gguf_arch` it is), the hyperparameters from its `<arch>.*` keys, every tensor dequantized by gguf-py (any block
type: Q4_1, Q8_0, K-quants...) when it is read, q/k rows returned from llama.cpp's pair-wise RoPE layout to the
Hugging Face one, and stacked experts split again. The tokenizer and chat template are rebuilt from the file's
`tokenizer.*` keys. gguf-py memory-maps the file: tensors are read one at a time, on demand.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.core.arch import FAMILIES, ArchConfig
from toolkit.core.bundle import ModelBundle, TensorRef
from toolkit.core.errors import ToolkitError
from toolkit.core.rope_layout import pair_permuted_heads, pairs_to_half

MAGIC = b"GGUF"
# GGUF architecture -> family: the inverse of the table's gguf_arch (MiniMind2-MoE is llama.cpp's granitemoe)
GGUF_FAMILIES = {fam.gguf_arch: name for name, fam in FAMILIES.items() if fam.gguf_arch}
# float tensor types read in their own dtype (bf16 as its uint16 bits, toolkit.core.bundle.NUMPY_BITS); every other block
# type is dequantized to float32 by gguf-py
_PLAIN = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")


def detect(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == MAGIC


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise ToolkitError("reading a GGUF needs the gguf package", "pip install 'edge-toolkit[gguf]'") from None
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors on damaged files
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ToolkitError(f"cannot read {path.name} as GGUF: {reason}",
                           "the file is truncated or damaged; download or convert it again") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ToolkitError(f"cannot read {path.name}: tensor {t.name} lies beyond the end of the file",
                               "the file is truncated; download or convert it again")
    return reader


def field_value(reader, key: str, default: Any = None) -> Any:
    """A metadata value as Python (str, number, bool, list), or `default` when the key is absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _f32_decimal(x: float) -> float:
    """GGUF stores eps and theta as float32: 1e-5 reads back as 9.99999974e-06. The shortest decimal that is the
    same float32 is what the model's config said."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def config_from_gguf(reader, path: Path) -> ArchConfig:
    arch = field_value(reader, "general.architecture")
    family_name = GGUF_FAMILIES.get(arch)
    if family_name is None:
        raise ToolkitError(f"{path.name} is a GGUF of architecture '{arch}', which the toolkit does not compute",
                           "supported GGUF architectures: " + ", ".join(sorted(GGUF_FAMILIES)))
    fam = FAMILIES[family_name]

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        value = field_value(reader, f"{arch}.{name}", default)
        if required and value is None:
            raise ToolkitError(f"{path.name} lacks {arch}.{name}", "the file's metadata is incomplete")
        if isinstance(value, list):  # per-layer values: only uniform ones are a plain decoder
            if len(set(value)) != 1:
                raise ToolkitError(f"{path.name}: {arch}.{name} differs between layers ({value[:4]}...)",
                                   "per-layer head counts or widths are not supported")
            value = value[0]
        return value

    _refuse_rope_scaling(reader, arch, path)
    tensors = {t.name: t for t in reader.tensors}
    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length") or key("rope.dimension_count") or hidden // heads)
    embd = tensors.get("token_embd.weight")  # gguf-py lists dims innermost first: [hidden, vocab]
    vocab = key("vocab_size") or (int(embd.shape[-1]) if embd is not None else None)
    if vocab is None:
        raise ToolkitError(f"{path.name} has no token_embd.weight and no {arch}.vocab_size",
                           "the file is incomplete")
    cfg = ArchConfig(
        family=family_name, vocab_size=int(vocab), hidden_size=hidden, num_layers=int(key("block_count",
                                                                                           required=True)),
        num_heads=heads, num_kv_heads=int(key("attention.head_count_kv") or heads), head_dim=head_dim,
        intermediate_size=0 if fam.moe else int(key("feed_forward_length", required=True)),
        rms_norm_eps=_f32_decimal(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32_decimal(key("rope.freq_base", 10000.0)),
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field_value(reader, "tokenizer.ggml.padding_token_id"))
    if key("rope.dimension_count") not in (None, head_dim):
        raise ToolkitError(f"{path.name} rotates {key('rope.dimension_count')} of {head_dim} head channels",
                           "partial rotary embeddings are not supported")
    if fam.moe:
        cfg.num_experts = int(key("expert_count", required=True))
        cfg.num_experts_per_tok = int(key("expert_used_count", required=True))
        cfg.moe_intermediate_size = int(key("expert_feed_forward_length") or key("feed_forward_length"))
        # llama.cpp's MoE archs fix the renormalisation (exporters/gguf/tensors.py RENORMALISES)
        cfg.norm_topk_prob = arch != "qwen2moe"
        if fam.shared_expert:
            cfg.shared_expert_intermediate_size = int(key("expert_shared_feed_forward_length", required=True))
    if arch == "granitemoe":
        _require_plain_granite(key, head_dim, path)
    cfg.extra["gguf_arch"] = arch
    return cfg.validate()


def _require_plain_granite(key, head_dim: int, path: Path) -> None:
    """granitemoe is MiniMind2-MoE only with every Granite multiplier at what a plain decoder does; a real Granite
    model scales embeddings, residuals, attention and logits, which the table's families do not compute."""
    wanted = {"embedding_scale": 1.0, "residual_scale": 1.0, "logit_scale": 1.0, "attention.scale": head_dim ** -0.5}
    for name, value in wanted.items():
        got = key(name)
        if got is None or abs(float(got) - value) > 1e-6 * max(1.0, value):
            raise ToolkitError(f"{path.name} is a Granite MoE with {name} = {got}; only MiniMind2-MoE files "
                               f"({name} = {value:g}) are computed", "this model's architecture is not supported")


def _refuse_rope_scaling(reader, arch: str, path: Path) -> None:
    kind = field_value(reader, f"{arch}.rope.scaling.type")
    has_factors = any(t.name == "rope_freqs.weight" for t in reader.tensors)
    if (kind not in (None, "none")) or has_factors:
        raise ToolkitError(f"{path.name} uses RoPE scaling ({kind or 'rope_freqs factors'}), which reading from "
                           "GGUF does not support yet", "convert the model from its Hugging Face folder instead")


class _Dequantized:
    """gguf-py's dequantization of one stored tensor, kept while consecutive expert slices of it are read."""

    def __init__(self, reader):
        self.reader = reader
        self._cached = lru_cache(maxsize=1)(self._dequantize)

    def _dequantize(self, name: str) -> np.ndarray:
        import gguf

        t = next(t for t in self.reader.tensors if t.name == name)
        kind = t.tensor_type.name
        if kind == "F32" or kind == "F16":
            return np.array(t.data)
        if kind == "BF16":  # carried as its uint16 bits (toolkit.core.bundle.NUMPY_BITS)
            return np.array(t.data).view(np.uint16)
        return gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)

    def __call__(self, name: str) -> np.ndarray:
        return self._cached(name)


def _stored_dtype(t) -> str:
    return _PLAIN.get(t.tensor_type.name, "float32")


def tensor_refs(reader, cfg: ArchConfig, path: Path) -> dict[str, TensorRef]:
    import gguf

    arch = cfg.extra["gguf_arch"]
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(arch_id, cfg.num_layers)
    stored = {t.name: t for t in reader.tensors}
    data = _Dequantized(reader)
    refs: dict[str, TensorRef] = {}
    used: set[str] = set()
    for name, shape in cfg.expected_shapes().items():
        m = _EXPERT.match(name)
        if m:
            layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
            gname = name_map.get_name(f"model.layers.{layer}.mlp.experts.{proj}") + ".weight"
        else:
            base, suffix = name.rsplit(".", 1)
            gname = f"{name_map.get_name(base)}.{suffix}"
            expert = None
        t = stored.get(gname)
        if t is None:
            raise ToolkitError(f"{path.name} lacks tensor {gname} ({name})",
                               f"is it a complete {arch} model? the file may be truncated or of another layout")
        used.add(gname)
        heads = pair_permuted_heads(name, cfg)
        refs[name] = TensorRef(name, tuple(shape), _stored_dtype(t) if expert is None else "float32", None,
                               lambda g=gname, e=expert, h=heads, s=tuple(shape): _read(data, g, e, h, s))
    extra = sorted(set(stored) - used - {"output.weight", "rope_freqs.weight"})
    if extra:
        raise ToolkitError(f"{path.name} has tensors the {cfg.family} architecture does not use: "
                           f"{', '.join(extra[:3])}", "the file is of a variant the toolkit does not compute")
    if not cfg.tie_word_embeddings:
        t = stored["output.weight"]
        refs["lm_head.weight"] = TensorRef("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), _stored_dtype(t),
                                           None, lambda: _read(data, "output.weight", None, None,
                                                               (cfg.vocab_size, cfg.hidden_size)))
    return refs


def _read(data: _Dequantized, gname: str, expert: int | None, heads: int | None, shape: tuple[int, ...]
          ) -> np.ndarray:
    a = data(gname)
    if expert is not None:
        a = a.reshape(-1, *shape)[expert]
        a = a.astype(np.float32, copy=False)
    a = a.reshape(shape)
    if heads:
        a = pairs_to_half(a, heads)  # llama.cpp's `llama` arch keeps q/k rows in consecutive pairs
    return np.ascontiguousarray(a)


def load(path: Path, overrides: dict[str, Any]) -> ModelBundle:
    from toolkit.core.tokenizer import Tokenizer

    for option in ("arch", "config", "num_heads", "experts_per_tok", "step"):
        if option in overrides:
            raise ToolkitError(f"--{option.replace('_', '-')} does not apply to a GGUF file",
                               "a GGUF carries its own architecture and hyperparameters")
    reader = _reader(path)
    cfg = config_from_gguf(reader, path)
    refs = tensor_refs(reader, cfg, path)
    if "tokenizer" in overrides:
        tokenizer = Tokenizer.from_dir(overrides["tokenizer"])
    else:
        from toolkit.checkpoints.gguf_tokenizer import tokenizer_from_gguf

        tokenizer = tokenizer_from_gguf(reader)
    file_type = field_value(reader, "general.file_type")
    types = sorted({t.tensor_type.name for t in reader.tensors})
    provenance = {"format": "gguf", "path": str(path), "gguf_arch": cfg.extra["gguf_arch"],
                  "gguf_file_type": file_type, "gguf_tensor_types": types,
                  "gguf_name": field_value(reader, "general.name")}
    return ModelBundle(cfg, refs, tokenizer, provenance)



"""Bundle tensors -> GGUF tensors: names from gguf-py's map, q/k permutation for llama's pair-wise RoPE, experts
stacked per layer, and the type each tensor gets for an output type."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterator

import gguf
import numpy as np

from exporters.gguf.convert import convert_into, require_finite, to_f32
from toolkit.core import rope
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError
from toolkit.core.rope_layout import half_to_pairs, pair_permuted_heads

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3,
         "qwen3moe": gguf.MODEL_ARCH.QWEN3MOE, "qwen2moe": gguf.MODEL_ARCH.QWEN2MOE,
         "granitemoe": gguf.MODEL_ARCH.GRANITE_MOE}
# archs whose loader falls back to token_embd when output.weight is absent (tied embeddings); others need it written
TIED_FALLBACK = {"llama", "qwen2", "qwen3", "qwen3moe", "granitemoe"}
# llama.cpp's MoE archs fix whether the top-k expert weights are renormalised (build_moe_ffn's norm_w)
RENORMALISES = {"qwen3moe": True, "qwen2moe": False, "granitemoe": True}

# llama.cpp archs whose graph hands per-frequency factors (the rope_freqs tensor, llama3 scaling) to its RoPE
# (src/models/llama.cpp, granite.cpp); qwen2, qwen3, qwen3moe and qwen2moe pass none
ROPE_FREQS_ARCHS = {"llama", "granitemoe"}
# YaRN's beta_fast/beta_slow as llama.cpp uses them on these archs: only other archs (grok, mistral3) read the
# yarn_beta_* keys, and the correction range is always rounded outward to whole dimensions (ggml_rope_yarn_corr_dims)
LLAMA_CPP_YARN_BETAS = (32.0, 1.0)

OUTTYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
            "q4_0": gguf.GGMLQuantizationType.Q4_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order
    qtype: gguf.GGMLQuantizationType
    read: Callable[[], np.ndarray]  # source values in numpy order, as NUMPY_BITS[dtype] (bfloat16 as uint16 bits)
    sources: tuple[str, ...]  # bundle tensors it holds (several: experts stacked on axis 0)
    dtype: str  # the source's dtype name (toolkit.core.bundle.NUMPY_BITS)
    fallback: str = ""  # why the requested type could not be used
    blocks: Callable[[], np.ndarray] | None = None  # ready-made quantized blocks (GPTQ codes repacked), else None

    @property
    def nbytes(self) -> int:
        byte_shape = gguf.quant_shape_to_byte_shape(self.shape, self.qtype) if self.qtype not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else self.shape
        item = {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2}.get(self.qtype, 1)
        return int(np.prod(byte_shape)) * item

    @property
    def elementwise(self) -> np.dtype | None:
        """The float dtype of an F32/F16 tensor converted value by value (so in chunks, straight into the writer's
        buffer: writer._write_converted); None for quantized tensors, converted whole by data()."""
        if self.blocks is None and self.qtype == gguf.GGMLQuantizationType.F16:
            return np.dtype(np.float16)
        if self.blocks is None and self.qtype == gguf.GGMLQuantizationType.F32:
            return np.dtype(np.float32)
        return None

    def data(self) -> np.ndarray:
        """The whole tensor as the file stores it."""
        if self.blocks is not None:
            return self.blocks()
        src = self.read()
        if self.elementwise is not None:
            out = np.empty(self.shape, self.elementwise)
            self.convert(src, out)
            return out
        values = to_f32(src, self.dtype)
        require_finite(values, src, self.dtype, self.what)
        return gguf.quants.quantize(values, self.qtype)

    def convert(self, src: np.ndarray, out: np.ndarray) -> None:
        """`src` (any slice of read()'s values, flattened) converted into `out` (elementwise dtype, same size)."""
        convert_into(src, self.dtype, out)
        require_finite(out, src, self.dtype, self.what)

    @property
    def what(self) -> str:
        return " and ".join(self.sources[:2]) + (" ..." if len(self.sources) > 2 else "")


def gguf_arch(bundle: ModelBundle) -> str:
    cfg = bundle.config
    arch = cfg.fam.gguf_arch
    if arch in RENORMALISES and RENORMALISES[arch] != cfg.norm_topk_prob:
        raise ToolkitError(f"llama.cpp's {arch} {'always' if RENORMALISES[arch] else 'never'} renormalises the "
                           f"top-k expert weights; this {cfg.family} model "
                           f"{'does not' if RENORMALISES[arch] else 'does'}, so no GGUF computes it exactly",
                           "this model cannot be exported to GGUF without changing its numbers")
    if arch not in ARCHS and cfg.fam.gguf_refusal:
        raise ToolkitError(cfg.fam.gguf_refusal, "export it to ONNX instead (`toolkit export onnx`); a GGUF "
                                                 "written anyway would run with different numbers")
    if arch not in ARCHS:
        raise ToolkitError(f"no llama.cpp architecture computes {bundle.config.family} exactly in this version",
                           f"GGUF export supports: {', '.join(f for f, fam in _families() if fam in ARCHS)}")
    rope_scaling_for_llama_cpp(cfg, arch)
    return arch


def rope_scaling_for_llama_cpp(cfg, arch: str) -> dict | None:
    """How llama.cpp computes this model's RoPE scaling on `arch` (None: plain RoPE): {"type": "linear" | "yarn",
    "factor", ...} for the rope.scaling.* keys, or {"freq_factors": [hd/2] float32} for llama3's rope_freqs tensor
    (llama.cpp divides each angle by its factor). What llama.cpp cannot compute is refused with the reason."""
    s = cfg.rope_scaling
    if not s:
        return None
    kind = s["rope_type"]
    hint = "export it to ONNX or MNN (`toolkit export onnx|mnn`), which compute it" if kind != "dynamic" else \
        "run it with `toolkit generate CKPT` (the reference model computes it)"
    if kind == "dynamic":
        raise ToolkitError("llama.cpp has no dynamic NTK RoPE scaling: its frequencies are fixed when the model "
                           "loads, while transformers recomputes them from each call's length once it passes "
                           f"max_position_embeddings ({cfg.max_position_embeddings})", hint)
    if kind == "linear":
        return {"type": gguf.RopeScalingType.LINEAR, "factor": s["factor"]}
    if kind == "llama3":
        if arch not in ROPE_FREQS_ARCHS:
            raise ToolkitError(f"llama.cpp's {arch} graph applies no per-frequency RoPE factors, which llama3 "
                               f"scaling needs (only {', '.join(sorted(ROPE_FREQS_ARCHS))} read rope_freqs)", hint)
        plain, _ = rope.frequencies(cfg.head_dim, cfg.rope_theta, None, cfg.max_position_embeddings, xp=np)
        scaled, _ = rope.frequencies(cfg.head_dim, cfg.rope_theta, s, cfg.max_position_embeddings, xp=np)
        return {"freq_factors": (plain / scaled).astype(np.float32)}
    # yarn: llama.cpp mixes the interpolated (1/factor) and original angles over the correction range of its fixed
    # betas, and multiplies cos/sin by rope.scaling.attn_factor times 0.1 ln(factor) + 1 (llama-context.cpp)
    betas = (s.get("beta_fast") or 32.0, s.get("beta_slow") or 1.0)
    if betas != LLAMA_CPP_YARN_BETAS:
        raise ToolkitError(f"llama.cpp's {arch} computes YaRN with beta_fast/beta_slow 32/1 (it reads no "
                           f"yarn_beta keys for this arch); this model uses {betas[0]:g}/{betas[1]:g}", hint)
    if not s.get("truncate", True):
        raise ToolkitError("llama.cpp rounds YaRN's correction range to whole dimensions; this model's "
                           "rope_scaling has truncate: false", hint)
    mscale = 0.1 * math.log(s["factor"]) + 1.0 if s["factor"] > 1 else 1.0
    return {"type": gguf.RopeScalingType.YARN, "factor": s["factor"],
            "original_context_length": s["original_max_position_embeddings"],
            "attn_factor": rope.yarn_attention_factor(s) / mscale}


def rope_tensors(bundle: ModelBundle) -> list[PlannedTensor]:
    """llama3 scaling's per-frequency factors as llama.cpp reads them (`rope_freqs.weight`, f32); none otherwise."""
    plan_ = rope_scaling_for_llama_cpp(bundle.config, bundle.config.fam.gguf_arch)
    if not plan_ or "freq_factors" not in plan_:
        return []
    factors = plan_["freq_factors"]
    return [PlannedTensor("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32,
                          lambda: factors, ("rope_freqs (llama3 RoPE factors)",), "float32")]


def _families():
    from toolkit.core.arch import FAMILIES

    return [(name, fam.gguf_arch) for name, fam in FAMILIES.items()]


def _tensor_type(gname: str, shape: tuple[int, ...], outtype: str) -> tuple[gguf.GGMLQuantizationType, str]:
    wanted = OUTTYPES[outtype]
    if len(shape) == 1 or gname.endswith("_norm.weight") or ".ffn_gate_inp." in gname:
        return gguf.GGMLQuantizationType.F32, ""  # norms, biases and routers stay exact, as llama.cpp's converter
    if wanted in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        return wanted, ""
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return gguf.GGMLQuantizationType.F16, f"row width {shape[-1]} is not a multiple of {block}"
    return wanted, ""


def plan(bundle: ModelBundle, outtype: str) -> Iterator[PlannedTensor]:
    cfg = bundle.config
    arch = gguf_arch(bundle)
    name_map = gguf.get_tensor_name_map(ARCHS[arch], cfg.num_layers)
    experts: dict[tuple[int, str], list[str]] = {}
    for name, ref in bundle.tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$", name)
        if m:
            experts.setdefault((int(m.group(1)), m.group(3)), []).append(name)
            continue
        base, suffix = name.rsplit(".", 1)
        gname = name_map.get_name(base)
        if gname is None:
            raise ToolkitError(f"no GGUF name for tensor {name}", "this tensor's architecture is not supported")
        gname = f"{gname}.{suffix}"
        read = _reader(bundle, name, cfg)
        qtype, why = _tensor_type(gname, ref.shape, outtype)
        if bundle.quantized_parts and name not in bundle.quantized_parts and len(ref.shape) == 2 and qtype not in (
                gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
            # a quantized checkpoint keeps its embedding and head at full precision; so does the file
            qtype, why = gguf.GGMLQuantizationType.F16, "not quantized in the source checkpoint"
        blocks = _q4_0_from_gptq(bundle, name, cfg) if qtype == gguf.GGMLQuantizationType.Q4_0 else None
        yield PlannedTensor(gname, tuple(ref.shape), qtype, read, (name,), ref.dtype, why, blocks)
    if cfg.tie_word_embeddings and arch not in TIED_FALLBACK:
        embed = "model.embed_tokens.weight"
        qtype, why = _tensor_type("output.weight", bundle.tensors[embed].shape, outtype)
        if bundle.quantized_parts and qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            qtype, why = gguf.GGMLQuantizationType.F16, "not quantized in the source checkpoint"
        yield PlannedTensor("output.weight", tuple(bundle.tensors[embed].shape), qtype,
                            _reader(bundle, embed, cfg), (embed,), bundle.tensors[embed].dtype, why)
    for (layer, proj), names in sorted(experts.items()):
        names = sorted(names, key=lambda n: int(n.split(".mlp.experts.")[1].split(".")[0]))
        gname = name_map.get_name(f"model.layers.{layer}.mlp.experts.{proj}") + ".weight"
        shape = (len(names), *bundle.tensors[names[0]].shape)
        qtype, why = _tensor_type(gname, shape, outtype)
        dtypes = {bundle.tensors[n].dtype for n in names}
        if len(dtypes) > 1:
            raise ToolkitError(f"the experts of layer {layer}'s {proj} are stored in different dtypes "
                               f"({', '.join(sorted(dtypes))})", "convert the checkpoint to one dtype")
        yield PlannedTensor(gname, shape, qtype,
                            lambda names=names: np.stack([bundle.tensors[n].array() for n in names]),
                            tuple(names), dtypes.pop(), why)


def gptq_q4_0_exact(bundle: ModelBundle) -> bool:
    """A GPTQ checkpoint whose grid is Q4_0's: symmetric, groups of 32 along the input, fp16 scales; then
    w = scale * (code - 8) is Q4_0's d * (q - 8) with q = code, d = scale."""
    q = bundle.provenance.get("quantization") or {}
    return q.get("quant_method") == "gptq" and q.get("bits") == 4 and q.get("sym") and q.get("group_size") == 32


def _q4_0_from_gptq(bundle: ModelBundle, name: str, cfg) -> Callable[[], np.ndarray] | None:
    parts = bundle.quantized_parts.get(name)
    if parts is None or not gptq_q4_0_exact(bundle):
        return None

    def blocks() -> np.ndarray:
        import torch

        from toolkit.core import gptq_format

        codes, scales, zeros, g_idx = gptq_format.unpack(parts())
        if not bool((zeros == 8).all()) or not gptq_format.consecutive_groups(g_idx, 32):
            raise ToolkitError(f"{name}: GPTQ zero points or g_idx are not Q4_0's", "export with --outtype q8_0")
        scales = scales.T.contiguous()  # [out, groups]
        heads = pair_permuted_heads(name, cfg)
        if heads:  # the same row order llama.cpp's q/k rows get
            codes, scales = half_to_pairs(codes.float(), heads).long(), half_to_pairs(scales, heads)
        rows, cols = codes.shape
        q = codes.reshape(rows, cols // 32, 32).to(torch.uint8).numpy()
        qs = q[:, :, :16] | (q[:, :, 16:] << 4)  # element j in the low nibble, j + 16 in the high one
        d = scales.to(torch.float16).numpy().reshape(rows, cols // 32, 1).view(np.uint8)
        return np.concatenate([d, qs], axis=-1).reshape(rows, -1)

    return blocks


def _reader(bundle: ModelBundle, name: str, cfg) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        a = bundle.tensors[name].array()
        heads = pair_permuted_heads(name, cfg)
        if heads:
            a = half_to_pairs(a, heads)
        return np.ascontiguousarray(a)

    return read

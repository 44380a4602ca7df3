"""Write a GGUF file from a bundle, streaming one tensor at a time, then verify it in llama.cpp."""
from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np

from exporters.gguf.direct_write import DirectAppender
from exporters.gguf.tensors import (
    FILE_TYPES,
    OUTTYPES,
    PlannedTensor,
    gguf_arch,
    plan,
    rope_scaling_for_llama_cpp,
    rope_tensors,
)
from exporters.gguf.vocab import add_vocab
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError


@dataclass
class GGUFReport:
    path: str
    arch: str
    outtype: str
    size_bytes: int
    n_params: int
    fallbacks: list[str] = field(default_factory=list)
    seconds: float = 0.0
    verification: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    tensor_types: dict[str, int] = field(default_factory=dict)  # GGML type -> tensor count
    # codes placed into llama.cpp's file (exporters/gguf/blocks.py): {"method", "tensors", ...}; None: llama.cpp's
    rounding: dict[str, Any] | None = None

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.size_bytes / self.n_params


def _metadata(w: gguf.GGUFWriter, bundle: ModelBundle, arch: str, outtype: str) -> list[str]:
    cfg = bundle.config
    w.add_name(Path(bundle.provenance.get("path", "model")).stem)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size or cfg.moe_intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)  # llama.cpp silently defaults it to head_count
    w.add_rope_freq_base(cfg.rope_theta)  # llama.cpp silently defaults it to 10000
    w.add_rope_dimension_count(cfg.head_dim)
    _rope_scaling(w, cfg, arch)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(FILE_TYPES[outtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if cfg.fam.moe:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if cfg.fam.shared_expert:
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    if arch == "granitemoe":  # Granite's multipliers, all read by llama.cpp: set to what a plain decoder does
        w.add_embedding_scale(1.0)
        w.add_residual_scale(1.0)
        w.add_logit_scale(1.0)
        w.add_attention_scale(1.0 / cfg.head_dim ** 0.5)
    return add_vocab(w, bundle.tokenizer, cfg.vocab_size)


def _rope_scaling(w: gguf.GGUFWriter, cfg, arch: str) -> None:
    """The rope.scaling.* keys llama.cpp reads (llama-model.cpp): linear as its factor; yarn as its factor, the
    pretraining context and the attention factor left after llama.cpp's own 0.1 ln(factor) + 1. llama3 has no
    keys: its per-frequency factors are the rope_freqs tensor (rope_tensors)."""
    s = rope_scaling_for_llama_cpp(cfg, arch)
    if not s or "type" not in s:
        return
    w.add_rope_scaling_type(s["type"])
    w.add_rope_scaling_factor(s["factor"])
    if s["type"] == gguf.RopeScalingType.YARN:
        w.add_rope_scaling_orig_ctx_len(s["original_context_length"])
        w.add_rope_scaling_attn_factors(s["attn_factor"])


def write_gguf(bundle: ModelBundle, path: Path, outtype: str,
               progress: Callable[[str, int, int], None] | None = None, direct: bool = True) -> GGUFReport:
    """The GGUF file at `path`, tensors converted and written one at a time. `direct`: bypass the page cache for
    the tensor data (off for a file that is read again at once, like the K-quantizer's f32 input)."""
    if outtype not in OUTTYPES:
        raise ToolkitError(f"unknown GGUF type '{outtype}'", f"choose one of: {', '.join(OUTTYPES)}")
    t0 = time.perf_counter()
    arch = gguf_arch(bundle)
    tensors = list(plan(bundle, outtype)) + rope_tensors(bundle)
    w = gguf.GGUFWriter(str(path), arch)
    warnings = _metadata(w, bundle, arch, outtype)
    for t in tensors:
        # quantized tensors are described by their byte shape; gguf-py turns it back into the element shape
        shape = t.shape if _plain(t) else gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
        w.add_tensor_info(t.name, shape, _np_dtype(t), t.nbytes, raw_dtype=None if _plain(t) else t.qtype)
    # gguf-py writes the header, metadata and tensor table; the tensor data is appended here, past the page cache
    # where the file system allows (exporters/gguf/direct_write.py: 5-10x faster on the measured machines)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    out = DirectAppender(path, start=path.read_bytes(), direct=direct)
    try:
        # the next tensor is read (and, where quantized, converted) in a second thread while this one is converted
        # into the appender's buffer, which a third thread writes out (numpy and file I/O release the GIL): at most
        # two tensors in memory at a time (two ahead measured no faster and +0.1 GB of peak memory on the 413M
        # benchmark model)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(_prepare, tensors[0]) if tensors else None
            for i, t in enumerate(tensors):
                data = pending.result()
                pending = pool.submit(_prepare, tensors[i + 1]) if i + 1 < len(tensors) else None
                try:
                    out.pad(w.data_alignment)  # where llama.cpp expects each tensor: the table's offsets
                    if t.elementwise is not None:
                        _write_converted(t, data, out)
                    else:
                        if data.nbytes != t.nbytes:  # a bug here, not bad input: the table is already written
                            raise RuntimeError(f"tensor {t.name} converted to {data.nbytes} bytes, its table entry "
                                               f"says {t.nbytes}")
                        out.write(data)
                except BaseException:
                    if pending is not None:
                        pending.cancel()
                    raise
                del data
                if progress:
                    progress(t.name, i + 1, len(tensors))
        out.pad(w.data_alignment)
    except BaseException:
        out.abort()
        raise
    out.close()
    fallbacks = [f"{t.name}: {t.fallback} -> {t.qtype.name}" for t in tensors if t.fallback]
    return GGUFReport(str(path), arch, outtype, path.stat().st_size, bundle.num_parameters(), fallbacks,
                      time.perf_counter() - t0, tensor_types=dict(Counter(t.qtype.name for t in tensors)),
                      warnings=warnings)


def _prepare(t: PlannedTensor):
    """What the writing thread needs of a tensor: its source values where they are converted value by value into
    the output buffer, else the whole converted tensor."""
    return t.read() if t.elementwise is not None else t.data()


# values converted per step: source and output pieces stay in the core's cache for the finite check (a 2M-value
# step measured 0.88 s per 413M bf16 values, 64-256K-value steps 0.62-0.65 s, on this project's 2-core machines)
CONVERT_STEP = 128 << 10


def _write_converted(t: PlannedTensor, src: np.ndarray, out: DirectAppender) -> None:
    """Convert `src` piece by piece straight into the appender's buffer: no converted copy of the tensor. (Splitting
    each piece between two threads measured no faster on 2 cores, interleaved runs: 2.68 s vs 2.54 s median.)"""
    flat = src.reshape(-1)
    item = t.elementwise.itemsize
    if flat.size * item != t.nbytes:
        raise RuntimeError(f"tensor {t.name} has {flat.size} values, its table entry says {t.nbytes} bytes")
    done = 0
    while done < flat.size:
        free = out.reserve()  # tensors start at 32-byte offsets and buffers are 4 MiB: whole values fit
        n = min(flat.size - done, free.size // item, CONVERT_STEP)
        t.convert(flat[done:done + n], free[:n * item].view(t.elementwise))
        out.commit(n * item)
        done += n


def _plain(t) -> bool:
    return t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def _np_dtype(t):
    return {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(t.qtype,
                                                                                                      np.uint8)


def write_manifest(report: GGUFReport, bundle: ModelBundle, path: Path, source_hash=None) -> None:
    from exporters.gguf.tensors import gptq_q4_0_exact
    from toolkit.core import manifest

    details = {"gguf_arch": report.arch, "bits_per_weight": report.bits_per_weight,
               "tensor_types": report.tensor_types, "fallbacks": report.fallbacks}
    repacked = report.outtype == "q4_0" and gptq_q4_0_exact(bundle)
    if report.rounding:
        details["from_quantized_checkpoint"] = report.rounding["method"]
    elif bundle.provenance.get("quantization"):
        details["from_quantized_checkpoint"] = (
            "Q4_0 blocks repacked from the GPTQ codes and fp16 scales (lossless)" if repacked else
            f"{report.outtype} written from the checkpoint's dequantized weights (re-quantized where the type is "
            "quantized; only symmetric GPTQ with group size 32 maps onto Q4_0 exactly)")
    quantization = None
    if report.outtype == "q8_0":
        quantization = {"method": "Q8_0 blocks written here (llama.cpp's rounding)", "type": "q8_0"}
    if report.rounding:
        quantization = {**report.rounding, "type": report.outtype}
    elif report.outtype not in ("f32", "f16", "bf16"):
        quantization = {"method": "GPTQ codes repacked into Q4_0" if repacked else
                        "llama.cpp's quantizer (llama_model_quantize)", "type": report.outtype}
    manifest.write(path, manifest.build(
        format="gguf", runtime="llama_cpp", artifact=Path(report.path).name, bundle=bundle, dtype=report.outtype,
        size_bytes=report.size_bytes, versions=manifest.package_versions("gguf", "llama-cpp-python", "torch"),
        verification=report.verification or None, source_hash=source_hash, quantization=quantization,
        warnings=report.warnings, details=details))

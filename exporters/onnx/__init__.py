"""ONNX for ONNX Runtime and onnxruntime-genai: `toolkit export onnx`, and `toolkit quantize int8|int4 --format
onnx`. The work is in exporter.py (graph, verification, folder) and quantize.py (ONNX Runtime's quantizers); this
module only declares the targets, light to import."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.core.targets import Target, beside, option

MODEL_FILE = "model.onnx"  # the graph inside an export folder (onnxruntime-genai's genai_config.json names it)


@dataclass(frozen=True)
class OnnxOptions:
    variant: str = option("portable", "portable: standard ONNX ops, every family, Optimum's I/O names. ort: ONNX "
                                      "Runtime's fused ops (GroupQueryAttention, SkipSimplifiedLayerNormalization, "
                                      "packed QKV) + genai_config.json for onnxruntime-genai; dense "
                                      "llama/qwen2/qwen3.")
    opset: int = option(20, "ONNX opset: 17 (what MNN's converter reads), 20, or 23 (RMSNormalization op).")
    verify: bool = option(True, "Run the graph in ONNX Runtime (batch of 2 left-padded prompts, prefill + 16 cached "
                                "steps) and compare logits with the reference model before keeping it.")


# SRC of `quantize --format onnx` is an export folder, or a checkpoint exported first with these
SOURCE_VARIANT_HELP = "Variant when SRC is a checkpoint (exported first)."
SOURCE_OPSET_HELP = "Opset when SRC is a checkpoint (exported first)."


@dataclass(frozen=True)
class OnnxInt8Options:
    variant: str = option("ort", SOURCE_VARIANT_HELP)
    opset: int = option(20, SOURCE_OPSET_HELP)


@dataclass(frozen=True)
class OnnxInt4Options:
    group_size: int = option(32, "Weights per scale (MatMulNBits): 16, 32, 64, 128 or 256.")
    lm_head_bits: int = option(8, "Bits of the lm_head (8 keeps the most sensitive matmul accurate; 4 is smaller).")
    variant: str = option("ort", SOURCE_VARIANT_HELP)
    opset: int = option(20, SOURCE_OPSET_HELP)


def is_export_folder(src: Path) -> bool:
    return (Path(src) / MODEL_FILE).is_file()


EXPORT_FOLDER = "a quantized ONNX export folder (a checkpoint is exported first, --variant ort)"
QUANTIZE = dict(command="quantize", format="onnx", module="exporters.onnx.quantize", handles=is_export_folder,
                input_name="SRC", input_help="A checkpoint, or an ONNX export folder (--format onnx).",
                output_help="Output folder.", extra="onnx", engine="onnxruntime")

TARGETS = (
    Target(command="export", name="onnx", summary="ONNX for ONNX Runtime (portable or fused ORT graph).",
           help="ONNX (fp32) for ONNX Runtime: model.onnx + model.onnx.data with a KV cache, tokenizer and "
                "manifest.json.",
           options=OnnxOptions, module="exporters.onnx.exporter",
           default_dest=lambda src, opts: beside(src, f"-onnx-{opts.variant}"),
           input_help="Checkpoint to export.", output_help="Output folder. Default: <ckpt>-onnx-<variant>.",
           extra="onnx", engine="onnxruntime"),
    Target(name="int8", summary=EXPORT_FOLDER,
           help="ONNX Runtime dynamic quantization (int8 weights per output channel, activations quantized per "
                "call), every MatMul including the lm_head.",
           options=OnnxInt8Options, entry="run_int8",
           default_dest=lambda src, opts: beside(src, "-onnx-int8"), **QUANTIZE),
    Target(name="int4", summary=EXPORT_FOLDER,
           help="MatMulNBits (symmetric, blockwise round-to-nearest, accuracy_level=4: int8 activations in the dot "
                "products), lm_head at --lm-head-bits; a GPTQ checkpoint's weights go into MatMulNBits as they are.",
           options=OnnxInt4Options, entry="run_int4",
           default_dest=lambda src, opts: beside(src, "-onnx-int4"), **QUANTIZE),
)

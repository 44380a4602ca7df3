"""`toolkit quantize int8|int4 --format hf`: the quantized-checkpoint targets (toolkit/core/targets.py). Light to
import; the work is in quant/checkpoint.py."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from toolkit.core.targets import Target, beside, option


@dataclass(frozen=True)
class Int8Options:
    """Nothing to choose: symmetric per output channel."""


# `--target gguf:TYPE`: llama.cpp file types whose codes GPTQ solves on the type's own block grids
GGUF_TARGETS = {"q4_0": 32, "q4_k_m": 32, "q5_k_m": 32, "q6_k": 16}  # -> the weights per scale of its main type


@dataclass
class Int4Options:
    method: str = option("gptq", "gptq (calibrated, error-compensating) or rtn (round-to-nearest).")
    target: str = option("gptq-v1", "Grid the codes are solved on. gptq-v1: GPTQ-v1 groups (--group-size, "
                                    "--sym), read by transformers/GPTQModel and put unchanged into ONNX MatMulNBits "
                                    "(export onnx --variant ort) and MNN (export mnn --bits 4 --group-size G). "
                                    "gguf:q4_0|q4_k_m|q5_k_m|q6_k: llama.cpp's blocks with llama-quantize's "
                                    "per-tensor mix for that file type (K-quant super-blocks, 6-bit sub-block "
                                    "scales; the output head solved too, see --gptq-head); `export gguf --outtype "
                                    "TYPE` writes the codes unchanged.")
    group_size: int = option(128, "Weights per scale: 32, 64, 128 or -1 (one per row).")
    sym: bool = option(True, "Symmetric grid (zero point 8) or asymmetric (min/max per group).", "--sym/--asym")
    act_order: bool = option(False, "GPTQ: quantize columns in order of decreasing Hessian diagonal (static "
                                    "groups, so g_idx stays i // group). Recommended for gguf targets on real "
                                    "models: SmolLM2-135M q4_k_m KLD 0.029 with it, 0.038 without.")
    damp: float = option(0.01, "GPTQ: dampening, as a fraction of the mean Hessian diagonal (raised ×10 and "
                               "reported if Cholesky fails).")
    nsamples: int = option(128, "GPTQ: calibration samples (at most).")
    seqlen: int = option(512, "GPTQ: tokens per calibration sample.")
    calib: Optional[Path] = option(None, "GPTQ calibration text. Default: the checkpoint's calib.txt (a sample of "
                                         "its training split).")
    embed_bits: int = option(16, "Bits of the token embedding (the output head too when tied): 16 keeps it as "
                                 "stored, loadable by transformers/GPTQModel; 8 stores it int8 per row, half the "
                                 "size, read by this toolkit's runtimes and exporters only.")
    gptq_head: bool = option(True, "gguf targets: GPTQ also solves the output head (the embedding too when tied) on "
                                   "the type llama.cpp gives it, over the final norm's outputs; --no-gptq-head "
                                   "keeps llama.cpp's rounding of it.", "--gptq-head/--no-gptq-head")
    device: str = option("auto", "GPTQ compute device: auto, cpu or cuda.")


CHECKPOINT = dict(command="quantize", format="hf", module="quant.checkpoint", default=True, input_name="SRC",
                  input_help="A checkpoint, or an ONNX export folder (--format onnx).", output_help="Output folder.")

TARGETS = (
    Target(name="int8", summary="a quantized checkpoint (Hugging Face folder)", entry="run_int8", options=Int8Options,
           help="Weight-only, symmetric per output channel (int8 weights + fp32 scales, quant_method toolkit_int8) "
                "for every linear layer of the decoder blocks.",
           default_dest=lambda src, opts: beside(src, "-int8"), **CHECKPOINT),
    Target(name="int4", summary="a quantized checkpoint (Hugging Face folder)", entry="run_int4", options=Int4Options,
           help="GPTQ or RTN of every linear layer of the decoder blocks, saved as GPTQ-v1 tensors (qweight, "
                "qzeros, scales, g_idx; quant_method gptq).",
           default_dest=lambda src, opts: beside(src, f"-{opts.method}4-g{opts.group_size}" if opts.target == "gptq-v1"
                                                 else f"-{opts.method}-{opts.target.split(':')[-1]}"), **CHECKPOINT),
)

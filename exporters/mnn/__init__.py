"""MNN for Alibaba's mobile engine: `toolkit export mnn`. The work is in exporter.py (graph, MNN's converter,
verification in MNN); this module only declares the target, light to import."""
from __future__ import annotations

from dataclasses import dataclass

from toolkit.core.targets import Target, beside, option


@dataclass(frozen=True)
class MnnOptions:
    bits: int = option(4, "Weight bits: 16 (fp16), 8 or 4 (block-wise, MNN's min/max grid; run with MNN's "
                          "low-memory int8 kernels).")
    group_size: int = option(64, "Input columns per scale for 8/4 bits; must divide every weight's input width; 0 = "
                                 "one scale per output channel.")
    hqq: bool = option(False, "Refine 8/4-bit scales with HQQ in MNN's converter.")
    verify: bool = option(True, "Run the model in MNN (prefill of 48 tokens + 16 cached steps) and judge its logits "
                                "against the reference model by the shared verifier's bar for the bit width before "
                                "keeping it.")


TARGETS = (Target(
    command="export", name="mnn", summary="MNN for Alibaba's mobile engine (16/8/4-bit weights).",
    help="MNN for Alibaba's mobile engine: model.mnn (graph with a fixed-capacity KV cache, opset-17 ONNX converted "
         "by the MNN wheel), a 16-bit embedding file, tokenizer and manifest.json. Never calls MNN's telemetry.",
    options=MnnOptions, module="exporters.mnn.exporter",
    default_dest=lambda src, opts: beside(src, f"-mnn-{opts.bits}bit"),
    input_help="Checkpoint to export.", output_help="Output folder. Default: <ckpt>-mnn-<bits>bit.",
    extra="mnn", engine="MNN"),)

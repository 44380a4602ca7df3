"""MNN for Alibaba's mobile engine: `toolkit export mnn`. The work is in engine.py (the folder MNN's LLM engine
runs, written by MNN's llmexport, verified through MNN.llm) and exporter.py (`--layout module`: the toolkit's own
graph for families the engine cannot compute); this module only declares the target, light to import."""
from __future__ import annotations

from dataclasses import dataclass

from toolkit.core.targets import Target, beside, option


@dataclass(frozen=True)
class MnnOptions:
    layout: str = option("engine", "engine: the folder MNN's own LLM engine runs (llm_demo, the MNN Chat app, "
                                   "MNN.llm): llm.mnn + llm.mnn.weight + llm_config.json + config.json + "
                                   "tokenizer.mtok, written by MNN's llmexport; every family but NanoChat and "
                                   "Qwen2-MoE. module: the toolkit's own graph (model.mnn with its KV cache as "
                                   "inputs), run only by this toolkit; every family.")
    bits: int = option(4, "Weight bits: 16 (fp16), 8 or 4 (block-wise, MNN's asymmetric min/max grid).")
    group_size: int = option(64, "Input columns per scale for 8/4 bits; must divide every weight's input width; 0 = "
                                 "one scale per output channel. A GPTQ checkpoint (`quantize int4`) at --bits 4 and "
                                 "its own group size keeps GPTQ's codes (engine layout); otherwise it is "
                                 "re-quantized, with a warning.")
    hqq: bool = option(False, "Refine 8/4-bit scales with HQQ in MNN's converter.")
    memory: str = option("low", "Engine layout: the `memory` setting written to config.json. low (MNN's default): "
                                "8/4-bit weights with int8 dynamic activations, 3-4x faster decode on x86; normal: "
                                "float activations, closer to the reference (SmolLM2-135M 8-bit: PPL +0.1 % "
                                "instead of +4.1 %).")
    verify: bool = option(True, "Run the model in MNN (engine layout: MNN.llm with its own KV cache) over a prefill "
                                "of 48 tokens + 16 cached steps and judge its logits against the reference model "
                                "by the shared verifier's bar for the bit width before keeping it; the engine "
                                "layout also checks MNN's tokenizer and chat template against the model's.")


TARGETS = (Target(
    command="export", name="mnn", summary="MNN for Alibaba's mobile engine (16/8/4-bit weights).",
    help="MNN for Alibaba's mobile engine. Default (--layout engine): the folder MNN's LLM engine runs -- "
         "`llm_demo DIR/config.json`, the MNN Chat app, MNN.llm -- written by MNN's own exporter (llmexport) and "
         "verified through MNN.llm. --layout module: model.mnn (the toolkit's graph with a fixed-capacity KV cache, "
         "converted by the MNN wheel), a 16-bit embedding file, tokenizer and manifest.json, run by this toolkit. "
         "Neither calls MNN's telemetry.",
    options=MnnOptions, module="exporters.mnn.run",
    default_dest=lambda src, opts: beside(src, f"-mnn-{opts.bits}bit"),
    input_help="Checkpoint to export.", output_help="Output folder. Default: <ckpt>-mnn-<bits>bit.",
    extra="mnn", engine="MNN"),)

"""GGUF for llama.cpp and Ollama: `toolkit export gguf`. The work is in exporter.py (write, verify in llama.cpp
against the reference model, then move into place); this module only declares the target, light to import."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from toolkit.core.targets import Target, beside, option


@dataclass(frozen=True)
class GGUFOptions:
    outtype: str = option("f16", "f32, f16, bf16, q8_0, q4_0, or llama.cpp's K-quants q4_k_m, q5_k_m, q6_k (norms "
                                 "and routers stay f32).")
    calib: Optional[Path] = option(None, "Calibration text for q4_0 and the K-quants: each weight's rounding error "
                                         "weighted by its input column's activation energy (llama.cpp's imatrix "
                                         "idea) on llama.cpp's grids and tensor mix. A `quantize int4 --target "
                                         "gguf:TYPE` checkpoint needs none: its GPTQ codes go in unchanged.")
    verify: bool = option(True, "Load the file in llama.cpp and compare logits and tokenization with the reference "
                                "model before keeping it.")


TARGETS = (Target(
    command="export", name="gguf", summary="GGUF for llama.cpp and Ollama.",
    help="GGUF for llama.cpp and Ollama; writes FILE.gguf, FILE.manifest.json and an Ollama FILE.Modelfile.",
    options=GGUFOptions, module="exporters.gguf.exporter",
    default_dest=lambda src, opts: beside(src, f"-{opts.outtype}.gguf"),
    input_help="Checkpoint to export.", output_help="Output FILE.gguf. Default: <ckpt>-<outtype>.gguf.",
    extra="gguf", engine="gguf"),)

"""bitsandbytes as a runtime (runtime.py): a checkpoint's decoder linears quantized in memory by bitsandbytes' own
layers. Chosen by name (eval-parity --with), never by path."""
from __future__ import annotations

from runtimes import RuntimeSpec

SPECS = (
    RuntimeSpec("bnb_int8", "bitsandbytes LLM.int8 (Linear8bitLt, threshold 6.0) of a checkpoint",
                "runtimes.bnb.runtime", "bitsandbytes", options={"mode": "int8"}, on_cuda=lambda: True,
                with_name="bnb-int8", extra="quant"),
    RuntimeSpec("bnb_nf4", "bitsandbytes NF4 with double quantization (Linear4bit) of a checkpoint",
                "runtimes.bnb.runtime", "bitsandbytes", options={"mode": "nf4"}, on_cuda=lambda: True,
                with_name="bnb-nf4", extra="quant"),
)

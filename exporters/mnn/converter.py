"""MNN's ONNX -> .mnn converter, run safely.

The wheel's `MNN.tools.mnnconvert` imports a logger that, at import, runs `pip install aliyun-log-python-sdk` and
then uploads conversion logs and /etc/machine-id to Alibaba's servers. We never import `MNN.tools`: the converter
is the C extension `_tools.mnnconvert`, called in a child process (it can abort the process on some inputs), and
its verdict is read from its output, because it returns True even on "Converted Failed!".
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from toolkit.core.errors import ToolkitError, VerificationError

# the child imports the converter extension and nothing else of the MNN package
CONVERT = "import sys, _tools; _tools.mnnconvert(sys.argv[1:])"
SUCCESS = "Converted Success!"


def converter_flags(bits: int, group_size: int, hqq: bool) -> list[str]:
    """16: fp16 weights; 8/4: block-wise weight quantization (MNN's default min/max asymmetric grid, fp32 scales;
    group size 0 = one block per output channel), optionally HQQ-refined."""
    if bits == 16:
        return ["--fp16"]
    flags = ["--weightQuantBits", str(bits), "--weightQuantBlock", str(group_size or -1)]
    return flags + (["--hqq"] if hqq else [])


def convert(onnx_path: Path, mnn_path: Path, flags: list[str]) -> str:
    """Convert, or raise with the converter's reason. Returns its log."""
    cmd = [sys.executable, "-c", CONVERT, "MNNConvert", "-f", "ONNX", "--modelFile", str(onnx_path),
           "--MNNModel", str(mnn_path), "--bizCode", "edge-toolkit", *flags]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    except OSError as e:  # pragma: no cover - the interpreter itself could not start
        raise ToolkitError(f"could not start MNN's converter: {e}", "check the Python installation") from None
    log = proc.stdout + proc.stderr
    if proc.returncode == 0 and SUCCESS in log and mnn_path.is_file() and mnn_path.stat().st_size > 0:
        return log
    if "No module named '_tools'" in log:
        raise ToolkitError("MNN's converter is not installed", "pip install -e '.[mnn]' (MNN==3.6.1)")
    reasons = [line.strip() for line in log.splitlines()
               if any(k in line for k in ("Not Support", "Error", "error", "Failed", "failed", "not support"))]
    reason = "; ".join(dict.fromkeys(reasons))[:400] or f"exit status {proc.returncode}, no '{SUCCESS}'"
    raise VerificationError(f"MNN's converter failed: {reason}", "nothing was kept; rerun with --debug and report "
                                                                 "the converter's output")

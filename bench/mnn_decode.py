#!/usr/bin/env python3
"""Benchmark (not a test): MNN prefill and decode speed on mm26 next to llama.cpp Q4_K_M / Q8_0 and ONNX Runtime
int4 / int8, all exported from the same checkpoint and measured in this one run, 1 thread
(../shared/bench/PROTOCOL.md), with each artifact's held-out perplexity.

Artifacts: MNN 16-bit, 8-bit g64, 4-bit g64 (and 4-bit g64 HQQ); ONNX ort-graph int8 and int4 (MatMulNBits g32);
GGUF Q8_0 and Q4_K_M. Speed: batch 1, a 256-token prompt (prefill tok/s), then 128 greedy tokens one at a time
through each runtime's KV cache (decode tok/s). Runs are interleaved -- each round runs every artifact once -- so a
shared machine's slow spells fall on all alike: median ± std of --runs rounds.
PPL: llama-perplexity scoring, chunks of 256, second half scored, on the checkpoint's heldout.txt (2 threads).

Usage: OMP_WAIT_POLICY=passive bench/mnn_decode.py CKPT [--workdir DIR] [--runs 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

from onnx_decode import heldout_ppl, toolkit  # noqa: E402

PROMPT, NEW = 256, 128


def interleaved(loaders: dict, prompt: list[int], rounds: int) -> dict[str, dict[str, list[float]]]:
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
    runtimes = {name: load() for name, load in loaders.items()}
    for rt in runtimes.values():  # warm-up: first-call planning and page faults are not what users feel per token
        rt.generate(prompt, 8, greedy)
    out = {name: {"prefill": [], "decode": []} for name in runtimes}
    for _ in range(rounds):
        for name, rt in runtimes.items():
            g = rt.generate(prompt, NEW, greedy)
            out[name]["prefill"].append(g.prefill_tps)
            out[name]["decode"].append(g.decode_tps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-ppl", action="store_true")
    args = ap.parse_args()

    from runtimes import RUNTIMES
    from toolkit.app.parity import artifact_size, runtime_for
    from toolkit.checkpoints import load_checkpoint

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-mnn-"))
    work.mkdir(parents=True, exist_ok=True)
    ck = str(args.ckpt)
    jobs = {
        "MNN 16-bit": (work / "mnn16", ["export", "mnn", ck, "--bits", "16"]),
        "MNN 8-bit g64": (work / "mnn8", ["export", "mnn", ck, "--bits", "8"]),
        "MNN 4-bit g64": (work / "mnn4", ["export", "mnn", ck, "--bits", "4"]),
        "MNN 4-bit g64 HQQ": (work / "mnn4-hqq", ["export", "mnn", ck, "--bits", "4", "--hqq"]),
        "ONNX int8 (ort graph)": (work / "onnx-int8", ["quantize", "int8", ck, "--format", "onnx"]),
        "ONNX int4 (ort graph, g32)": (work / "onnx-int4", ["quantize", "int4", ck, "--format", "onnx"]),
        "llama.cpp Q8_0": (work / "model-q8_0.gguf", ["export", "gguf", ck, "--outtype", "q8_0"]),
        "llama.cpp Q4_K_M": (work / "model-q4_k_m.gguf", ["export", "gguf", ck, "--outtype", "q4_k_m"]),
    }
    print(f"exporting into {work}", file=sys.stderr)
    for name, (dest, cmd) in jobs.items():
        t0 = time.perf_counter()
        if not dest.exists():
            toolkit(*cmd, "-o", str(dest))
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    bundle = load_checkpoint(args.ckpt)
    tokens = bundle.tokenizer.encode((args.ckpt / "heldout.txt").read_text(encoding="utf-8"), add_bos=False)
    prompt = tokens[:PROMPT]

    def loader(name: str, threads: int):
        path = jobs[name][0]
        return lambda: RUNTIMES[runtime_for(path)].load(path, threads=threads)

    names = list(jobs)
    sizes = {n: artifact_size(jobs[n][0]) for n in names}
    ppl, base = {}, None
    if not args.no_ppl:
        base = heldout_ppl(RUNTIMES["torch"].load(bundle, threads=2).logits, tokens)
        print(f"  ppl torch fp32: {base:.4f}", file=sys.stderr)
        for n in names:
            ppl[n] = heldout_ppl(loader(n, 2)().logits, tokens)
            print(f"  ppl {n}: {ppl[n]:.4f}", file=sys.stderr)
    speed = interleaved({n: loader(n, args.threads) for n in names}, prompt, args.runs)

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.0f} ± {statistics.stdev(values) if len(values) > 1 else 0:.0f}"

    if base:
        print(f"baseline: torch fp32 PPL {base:.4f}")
    print(f"| artifact | size MB | PPL | ΔPPL | prefill tok/s ({PROMPT} tokens) | decode tok/s ({NEW} tokens) |")
    print("|---|---|---|---|---|---|")
    for n in names:
        p = ppl.get(n)
        ppl_cells = f"{p:.4f} | {100 * (p / base - 1):+.2f} %" if p and base else "– | –"
        print(f"| {n} | {sizes[n] / 1e6:.1f} | {ppl_cells} | {cell(speed[n]['prefill'])} | "
              f"{cell(speed[n]['decode'])} |")
    print(f"\n{args.threads} thread(s), {args.runs} interleaved rounds")


if __name__ == "__main__":
    main()

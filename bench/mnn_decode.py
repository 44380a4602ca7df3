#!/usr/bin/env python3
"""Benchmark (not a test): MNN's LLM engine (MNN.llm over `toolkit export mnn`'s engine folders) prefill and
decode speed next to llama.cpp Q8_0 / Q4_K_M, ONNX Runtime int4 and the toolkit's own MNN graph (`--layout
module`), all exported from the same checkpoint and measured in this one run, 1 thread (../shared/bench/PROTOCOL.md),
with each artifact's perplexity on the text.

Artifacts: MNN engine 16-bit, 8-bit g64, 4-bit g64 (memory low, the default; 8/4-bit also run with memory normal);
MNN module 4-bit g64; ONNX ort-graph int4 (MatMulNBits g32); GGUF Q8_0 and Q4_K_M. Speed: batch 1, a 256-token
prompt (prefill tok/s), then 128 greedy tokens one at a time through each runtime's KV cache (decode tok/s). Runs
are interleaved -- each round runs every artifact once -- so a shared machine's slow spells fall on all alike:
median ± std of --runs rounds, and the median of the per-round ratios of MNN's engine to llama.cpp at the same
weight bits (8-bit : Q8_0, 4-bit : Q4_K_M).
PPL: llama-perplexity scoring, chunks of 256, second half scored, on --text (default: the checkpoint's
heldout.txt), 2 threads.

Usage: OMP_WAIT_POLICY=passive bench/mnn_decode.py CKPT [--text FILE] [--workdir DIR] [--runs 5] [--threads 1]
       [--prompt 256] [--no-ppl]
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
    ap.add_argument("--text", type=Path, help="text for the prompt and PPL (default: CKPT/heldout.txt)")
    ap.add_argument("--ppl-chars", type=int, default=0, help="score only the text's first N characters (0: all)")
    ap.add_argument("--prompt", type=int, default=PROMPT, help=f"prompt tokens before the decode (default {PROMPT})")
    args = ap.parse_args()

    from runtimes import RUNTIMES
    from toolkit.app.parity import artifact_size, runtime_for
    from toolkit.checkpoints import load_checkpoint

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-mnn-"))
    work.mkdir(parents=True, exist_ok=True)
    ck = str(args.ckpt)
    jobs = {
        "MNN engine 16-bit": (work / "mnn16", ["export", "mnn", ck, "--bits", "16"]),
        "MNN engine 8-bit g64": (work / "mnn8", ["export", "mnn", ck, "--bits", "8"]),
        "MNN engine 8-bit g64, memory normal": (work / "mnn8", None),
        "MNN engine 4-bit g64": (work / "mnn4", ["export", "mnn", ck, "--bits", "4"]),
        "MNN engine 4-bit g64, memory normal": (work / "mnn4", None),
        "MNN module 4-bit g64": (work / "mnn4-module", ["export", "mnn", ck, "--bits", "4", "--layout", "module"]),
        "ONNX int4 (ort graph, g32)": (work / "onnx-int4", ["quantize", "int4", ck, "--format", "onnx"]),
        "llama.cpp Q8_0": (work / "model-q8_0.gguf", ["export", "gguf", ck, "--outtype", "q8_0"]),
        "llama.cpp Q4_K_M": (work / "model-q4_k_m.gguf", ["export", "gguf", ck, "--outtype", "q4_k_m"]),
    }
    same_bits = {"MNN engine 8-bit g64": "llama.cpp Q8_0", "MNN engine 4-bit g64": "llama.cpp Q4_K_M",
                 "MNN engine 8-bit g64, memory normal": "llama.cpp Q8_0",
                 "MNN engine 4-bit g64, memory normal": "llama.cpp Q4_K_M"}
    print(f"exporting into {work}", file=sys.stderr)
    for name, (dest, cmd) in jobs.items():
        t0 = time.perf_counter()
        if cmd and not dest.exists():
            toolkit(*cmd, "-o", str(dest))
        print(f"  {name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    bundle = load_checkpoint(args.ckpt)
    text = (args.text or args.ckpt / "heldout.txt").read_text(encoding="utf-8")
    tokens = bundle.tokenizer.encode(text[:args.ppl_chars or None], add_bos=False)
    prompt = tokens[:args.prompt]

    def loader(name: str, threads: int):
        path = jobs[name][0]
        memory = {"memory_mode": "normal"} if name.endswith("memory normal") else {}
        return lambda: RUNTIMES[runtime_for(path)].load(path, threads=threads, **memory)

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
    print(f"| artifact | size MB | PPL | ΔPPL | prefill tok/s ({len(prompt)} tokens) | decode tok/s ({NEW} tokens) |")
    print("|---|---|---|---|---|---|")
    for n in names:
        p = ppl.get(n)
        ppl_cells = f"{p:.4f} | {100 * (p / base - 1):+.2f} %" if p and base else "– | –"
        print(f"| {n} | {sizes[n] / 1e6:.1f} | {ppl_cells} | {cell(speed[n]['prefill'])} | "
              f"{cell(speed[n]['decode'])} |")
    print(f"\n{args.threads} thread(s), {args.runs} interleaved rounds")
    print("\n| MNN engine : llama.cpp, same weight bits | decode ratio (median of rounds) | prefill ratio |")
    print("|---|---|---|")
    for mnn, gguf in same_bits.items():
        ratio = {k: statistics.median(a / b for a, b in zip(speed[mnn][k], speed[gguf][k]))
                 for k in ("decode", "prefill")}
        print(f"| {mnn} : {gguf} | {ratio['decode']:.2f}x | {ratio['prefill']:.2f}x |")


if __name__ == "__main__":
    main()

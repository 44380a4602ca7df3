#!/usr/bin/env python3
"""Benchmark (not a test): ONNX Runtime decode speed and held-out perplexity of every ONNX variant on mm26, next to
the PyTorch CPU reference and llama.cpp Q4_K_M, all measured in this one run (../shared/bench/PROTOCOL.md).

Variants: fp32 portable, fp32 ort (fused), int8 (ort graph, dynamic), int4 (ort graph, MatMulNBits g32 sym,
accuracy_level 4, lm_head 8-bit). Decode: batch 1, a 64-token prompt, 128 greedy tokens one at a time through
the runtime's KV cache (IO binding for ONNX Runtime), 1 and 2 threads. The runs are interleaved -- each round runs
every artifact once -- so a shared machine's slow and fast spells fall on all of them alike: median +- std of
--runs rounds, and the int4/Q4_K_M ratio as the median of the per-round ratios.
PPL: llama-perplexity scoring, chunks of 256, second half scored, on the checkpoint's heldout.txt.

Usage: OMP_WAIT_POLICY=passive bench/onnx_decode.py CKPT [--workdir DIR] [--runs 5] [--threads 1,2]
"""
from __future__ import annotations

import argparse
import os
import statistics
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


def interleaved_decode(loaders: dict, prompt: list[int], rounds: int) -> dict[str, list[float]]:
    """Decode tok/s per round for every runtime; one warm-up each (as eval-parity's timing does), then `rounds`
    rounds in which each runtime generates once."""
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
    runtimes = {name: load() for name, load in loaders.items()}
    for rt in runtimes.values():
        rt.generate(prompt[:32], 4, greedy)
    tps: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, rt in runtimes.items():
            tps[name].append(rt.generate(prompt, NEW, greedy).decode_tps)
    return tps


def heldout_ppl(logits_one, tokens: list[int]) -> float:
    from toolkit.core.perplexity import perplexity

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
    from toolkit.app.parity import artifact_size
    from toolkit.checkpoints import load_checkpoint

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
    speed, ratio = {}, {}
    for t in threads:
        tps = interleaved_decode({n: loader(n, t) for n in names}, prompt, args.runs)
        for n in names:
            med = statistics.median(tps[n])
            speed[(n, t)] = (med, statistics.stdev(tps[n]) if len(tps[n]) > 1 else 0.0, 1000.0 / med)
            print(f"  {n} {t} thread(s): {med:.1f} tok/s", file=sys.stderr)
        ratio[t] = statistics.median(a / b for a, b in zip(tps["onnx int4 (ort graph)"], tps["llama.cpp Q4_K_M"]))

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
    for t in threads:
        print(f"\nint4 ort graph / llama.cpp Q4_K_M decode speed, {t} thread(s), median of per-round ratios: "
              f"{ratio[t]:.2f}x")


if __name__ == "__main__":
    main()

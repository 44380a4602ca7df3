#!/usr/bin/env python3
"""Benchmark (not a test): what verification adds to `toolkit export gguf --outtype f16`, beside llama.cpp's own
converter (which verifies nothing), in interleaved rounds on one machine.

Each round runs, in a fresh process each and in an order reversed every other round:
  llama.cpp's convert_hf_to_gguf.py --outtype f16 (from the llama-cpp-python sdist, fetched by `make test`),
  toolkit export gguf --outtype f16 --no-verify,
  toolkit export gguf --outtype f16 (verified in llama.cpp against the streamed reference model).
Reported per command: median wall time, peak RSS (the kernel's maximum resident set, ru_maxrss) and the peak of
its anonymous part (RssAnon sampled every 5 ms: what cannot be given back to the page cache; the rest of RSS is
mapped files, chiefly the GGUF that llama.cpp maps to run it), and each median's ratio to the converter's.

Usage: bench/verify_cost.py CHECKPOINT [--rounds 3] [--threads N] [--workdir DIR] [--converter-pre NAME]
       [--only-ours]
Checkpoints: ../shared/bench/make_synth_llama.py writes the 413M model (default shape) and a 1B-class one
(--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --ffn 8192 --vocab 128256, Llama-3's tokenizer).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_measured(cmd: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak RSS and peak RssAnon (bytes) of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon = [0]

    def sample() -> None:
        status = Path(f"/proc/{proc.pid}/status")
        while proc.returncode is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError, ValueError):
                return
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    sampler.join()
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss * 1024, peak_anon[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, help="toolkit's --threads (default: its own, all cores)")
    p.add_argument("--workdir", type=Path, help="where the GGUF files go (default: a temp folder)")
    p.add_argument("--converter-pre", default="gpt-2", help="the pre-tokenizer llama.cpp's converter is told "
                   "(bench/llamacpp_converter.py; MiniMind's, the 413M model's, is gpt-2; '' for its own check)")
    p.add_argument("--only-ours", action="store_true", help="leave llama.cpp's converter out (e.g. a model its "
                                                             "converter cannot read)")
    a = p.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="verify-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(a.threads)] if a.threads else []
    toolkit = [sys.executable, "-m", "toolkit", "export", "gguf", str(a.checkpoint), "--outtype", "f16", "--force",
               *threads]
    commands = {
        "toolkit export gguf --outtype f16 (verified)": toolkit + ["-o", str(work / "ours-verified.gguf")],
        "toolkit export gguf --outtype f16 --no-verify": toolkit + ["-o", str(work / "ours.gguf"), "--no-verify"],
    }
    if not a.only_ours:
        from bench.llamacpp_converter import command

        commands = {"llama.cpp convert_hf_to_gguf.py --outtype f16": command(
            a.checkpoint, "f16", work / "llamacpp.gguf", pre=a.converter_pre or None), **commands}
    names = list(commands)
    for name in names:  # one unmeasured run each: page cache, .pyc files
        run_measured(commands[name])
    results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in names}
    for r in range(a.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            results[name].append(run_measured(commands[name]))
            seconds, rss, anon = results[name][-1]
            print(f"round {r + 1} {name}: {seconds:.2f} s, peak RSS {rss / 1e6:.0f} MB (anon {anon / 1e6:.0f} MB)",
                  flush=True)
    medians = {name: [statistics.median(x[i] for x in results[name]) for i in range(3)] for name in names}
    anchor = medians[names[0]]
    print(f"\n{a.checkpoint.name}, {a.rounds} interleaved rounds, medians (ratios to the first row)\n")
    print("| command | wall s | × | peak RSS MB | × | peak anonymous MB | × | wall s per round |")
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        s, rss, anon = medians[name]
        rounds = " / ".join(f"{x[0]:.2f}" for x in results[name])
        print(f"| {name} | {s:.2f} | {s / anchor[0]:.2f} | {rss / 1e6:.0f} | {rss / anchor[1]:.2f} | "
              f"{anon / 1e6:.0f} | {anon / max(anchor[2], 1):.2f} | {rounds} |")


if __name__ == "__main__":
    main()

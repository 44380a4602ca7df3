"""Decode speed of GGUF files of the same model side by side, for differences smaller than eval-parity's spread: each
measurement is a fresh process (load, a 4-token warm-up, then PROMPT tokens of TEXT and 128 greedy tokens at 1 thread,
as eval-parity's timing rows), the files alternate within a round and the order flips every round, so a slow spell of
the shared machine lands on both. Prints each file's tok/s per round and the median of the per-round ratios to the
first file.

    OMP_WAIT_POLICY=passive python bench/gguf_pair_decode.py CKPT TEXT FILE.gguf FILE.gguf [...] [--rounds 15]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ONE = """
import sys, numpy as np
sys.path.insert(0, {root!r})
from runtimes import RUNTIMES
from toolkit.checkpoints import load_checkpoint
ids = load_checkpoint({ckpt!r}).tokenizer.encode(open({text!r}).read()[:{chars}], add_bos=False)[:{prompt}]
rt = RUNTIMES["llama_cpp"].load({f!r}, threads=1, ctx={prompt} + 136)
greedy = lambda s: int(np.argmax(s))
rt.generate(ids, 4, greedy)
print(rt.generate(ids, 128, greedy).decode_tps)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("text")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prompt", type=int, default=512)
    args = ap.parse_args()
    tps: dict[str, list[float]] = {f: [] for f in args.files}
    for r in range(args.rounds):
        for f in args.files if r % 2 == 0 else args.files[::-1]:
            code = ONE.format(root=str(ROOT), ckpt=args.ckpt, text=args.text, chars=args.prompt * 20,
                              prompt=args.prompt, f=f)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            tps[f].append(float(out.stdout.split()[-1]))
        print(f"round {r + 1}: " + "  ".join(f"{Path(f).name} {tps[f][-1]:.1f}" for f in args.files), flush=True)
    first = args.files[0]
    print("\n| file | decode tok/s (median ± std) | ratio to the first (median of per-round ratios) |")
    print("|---|---|---|")
    for f in args.files:
        ratios = [a / b for a, b in zip(tps[f], tps[first])]
        print(f"| {Path(f).name} | {statistics.median(tps[f]):.1f} ± {statistics.stdev(tps[f]):.1f} | "
              f"{statistics.median(ratios):.3f} |")


if __name__ == "__main__":
    main()

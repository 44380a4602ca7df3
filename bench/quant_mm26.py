#!/usr/bin/env python3
"""Benchmark (not a test): the checkpoint quantizers on mm26 (../shared/bench/PROTOCOL.md), all rows in one run.

Quantizes CKPT to int8, RTN-4 g128, GPTQ-4 g128 and GPTQ-4 g128 act-order (timed, on --device), exports
llama.cpp Q4_K_M for reference (CPU runs only), then runs `toolkit eval-parity` on all of them plus bitsandbytes
int8 and NF4 (`--with bnb-int8,bnb-nf4`): PPL ± error, KLD and same-top-token against the baseline (fp32 on CPU,
fp16 on CUDA), sizes. Prints one markdown table.

Usage: bench/quant_mm26.py CKPT [--device cpu|cuda] [--workdir DIR] [--ctx 256] [--nsamples 128 --seqlen 512]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def toolkit(*args: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "toolkit", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed: toolkit {' '.join(args)}\n{proc.stderr[-3000:]}")
    lines = proc.stderr.strip().splitlines()
    print("   ", lines[-1][:200] if lines else "", file=sys.stderr)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-quant-"))
    work.mkdir(parents=True, exist_ok=True)
    ck = str(args.ckpt)
    calib = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
    jobs = {
        "int8 (per channel, weight-only)": (work / "int8", ["quantize", "int8", ck]),
        "RTN-4 g128": (work / "rtn4-g128", ["quantize", "int4", ck, "--method", "rtn"]),
        "GPTQ-4 g128": (work / "gptq4-g128", ["quantize", "int4", ck, *calib]),
        "GPTQ-4 g128 act-order": (work / "gptq4-g128-act", ["quantize", "int4", ck, "--act-order", *calib]),
    }
    seconds = {}
    for name, (dest, cmd) in jobs.items():
        seconds[name] = toolkit(*cmd, "-o", str(dest), "--force")
        report = json.loads((dest / "manifest.json").read_text())
        seconds[name] = report["details"]["seconds"]
    artifacts = [dest for dest, _ in jobs.values()]
    if args.device == "cpu":
        q4 = work / "mm26-q4_k_m.gguf"
        toolkit("export", "gguf", ck, "-o", str(q4), "--outtype", "q4_k_m", "--force")
        artifacts.append(q4)
    report_dir = work / "parity"
    toolkit("eval-parity", ck, *map(str, artifacts), "-o", str(report_dir), "--ctx", str(args.ctx), "--device",
            args.device, "--with", "bnb-int8,bnb-nf4", "--repeats", str(args.repeats), "--force")
    result = json.loads((report_dir / "parity.json").read_text())
    base = result["baseline"]
    names = {str(dest): name for name, (dest, _) in jobs.items()}
    print(f"baseline: torch {base['dtype']} {base['device']}, PPL {base['ppl']:.4f} ± {base['ppl_err']:.4f}, "
          f"{base['n_scored']} scored tokens, ctx {base['ctx']}; machine: {result['machine']}; {result['date']}")
    print("| row | size MB | bits/weight | PPL | ΔPPL | KLD | same top token | quantization time | device |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| baseline ({base['dtype']}) | {base['size_bytes'] / 1e6:.1f} | "
          f"{8 * base['size_bytes'] / base['n_params']:.2f} | {base['ppl']:.4f} ± {base['ppl_err']:.4f} | – | – | – "
          f"| – | {base['device']} |")
    for row in result["rows"]:
        if row.get("status") == "failed":
            print(f"| {row['name']} | failed: {row.get('error', '')[:80]} |")
            continue
        name = names.get(row["path"], row["name"])
        if row["runtime"].startswith("bnb_"):
            name = {"bnb_int8": "bitsandbytes LLM.int8 (threshold 6.0)",
                    "bnb_nf4": "bitsandbytes NF4 (double quant)"}[row["runtime"]]
        qt = f"{seconds[name]:.1f} s" if name in seconds else "–"
        print(f"| {name} | {row['size_bytes'] / 1e6:.1f} | {row['bits_per_weight']:.2f} | {row['ppl']:.4f} ± "
              f"{row['ppl_err']:.4f} | {row['ppl_delta_pct']:+.2f} % | {row['kld_mean']:.5f} | "
              f"{row['same_top_pct']:.1f} % | {qt} | {row.get('device', '')} |")


if __name__ == "__main__":
    main()

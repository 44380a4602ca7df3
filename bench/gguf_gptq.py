"""Issue 21's table: llama.cpp's own 4/5/6-bit GGUF files next to ours from the same float checkpoint, with
importance-weighted rounding (`export gguf --calib`) and with GPTQ on llama.cpp's grids (`quantize int4 --target
gguf:TYPE` then `export gguf --outtype TYPE`), plus ONNX int4 (ONNX Runtime's RTN vs GPTQ codes in MatMulNBits) and
MNN 4-bit (MNN's rounding vs GPTQ codes) -- all scored by one `toolkit eval-parity` run (interleaved timing).

llama.cpp's own files: its convert_hf_to_gguf.py (from the llama-cpp-python sdist) at f32, then its quantizer
(llama_model_quantize, what llama-quantize runs) at each type.

    python bench/gguf_gptq.py --model mm26|smollm2 [--types q4_0,q4_k_m,q5_k_m,q6_k] [--gptq-types q4_0,q4_k_m]
        [--calib FILE] [--chars N] [--repeats 3] [--work DIR] [--no-onnx-mnn] [--files-only]
        [--gptq-flags "--act-order --nsamples 256"] [--gptq-calib FILE] [--v1-flags "--asym --nsamples 128"]
        [--extra FILE ...]

Files already in --work are kept (so GPTQ files made on the GPU machine can be dropped in as ours-gptq-TYPE.gguf and
gptq-v1-g32/); --extra adds rows (other artifacts to score in the same run).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FTYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
          "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def run(*cmd, ok=(0,)) -> int:
    t0 = time.time()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, env=env)
    print(f"+ {' '.join(map(str, cmd))[:160]}  ({time.time() - t0:.0f} s, rc {proc.returncode})", flush=True)
    if proc.returncode not in ok:
        raise SystemExit(f"failed ({proc.returncode}): {proc.stderr[-1500:]}")
    return proc.returncode


def llama_quantize(src: Path, dst: Path, ftype: str, threads: int) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, FTYPES[ftype])
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp's quantizer failed on {src}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["mm26", "smollm2"], default="mm26")
    ap.add_argument("--types", default="q4_0,q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--gptq-types", default="q4_0,q4_k_m,q5_k_m,q6_k")
    ap.add_argument("--calib", type=Path, default=None, help="calibration text of the --calib rows (and of GPTQ "
                                                                "unless --gptq-calib)")
    ap.add_argument("--gptq-calib", type=Path, default=None, help="calibration text of the GPTQ runs")
    ap.add_argument("--v1-flags", default="", help="extra flags of the GPTQ-v1 g32 checkpoint (ONNX/MNN rows), "
                                                   "e.g. '--asym'")
    ap.add_argument("--extra", type=Path, nargs="*", default=[], help="more artifacts to score in the same run")
    ap.add_argument("--chars", type=int, default=0, help="score the first N characters of --text (0: all)")
    ap.add_argument("--text", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads for making the files")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--no-onnx-mnn", action="store_true")
    ap.add_argument("--files-only", action="store_true", help="make the files, skip eval-parity")
    ap.add_argument("--print-only", action="store_true", help="print the tables of the last run's parity.json")
    ap.add_argument("--gptq-flags", default="--act-order",
                    help="flags of every GPTQ `quantize int4` run (the gguf targets and the GPTQ-v1 g32 checkpoint), "
                         "e.g. '--act-order --nsamples 256'")
    args = ap.parse_args()
    from bench.llamacpp_converter import command as converter_command
    from tests.real_models import smollm2_hf_dir

    cache = Path.home() / ".cache" / "edge-toolkit"
    hf = cache / "mm26" if args.model == "mm26" else smollm2_hf_dir()
    calib = args.calib or (hf / "calib.txt" if args.model == "mm26" else
                           ROOT.parent / "shared" / "data" / "tinyshakespeare.txt")
    text = args.text or (hf / "heldout.txt" if args.model == "mm26" else
                         ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt")
    work = args.work or cache / f"gguf-gptq-{args.model}"
    work.mkdir(parents=True, exist_ok=True)
    if args.chars:
        (work / "text.txt").write_text(text.read_text()[:args.chars])
        text = work / "text.txt"
    toolkit = [sys.executable, "-m", "toolkit"]
    threads = ["--threads", str(args.threads)]
    rows: list[Path] = []
    f32 = work / "llamacpp-f32.gguf"
    if not f32.exists() and run(*converter_command(hf, "f32", f32), ok=(0, 1)):
        # its converter knows no MiniMind pre-tokenizer: our f32 file instead (issue 17: the same tensors as its
        # converter's on SmolLM2), quantized by llama.cpp's own quantizer all the same
        print("  llama.cpp's converter refused the tokenizer: llama.cpp's quantizer runs on `export gguf --outtype f32`")
        run(*toolkit, "export", "gguf", hf, "--outtype", "f32", "-o", f32, "--no-verify")
    for t in args.types.split(","):
        theirs = work / f"llamacpp-{t}.gguf"
        if not theirs.exists():
            llama_quantize(f32, theirs, t, args.threads)
        ours = work / f"ours-calib-{t}.gguf"
        if not ours.exists():
            run(*toolkit, "export", "gguf", hf, "--outtype", t, "--calib", calib, "-o", ours, *threads)
        rows += [theirs, ours]
    gptq_calib = args.gptq_calib or calib
    for t in [t for t in args.gptq_types.split(",") if t]:
        ckpt, out = work / f"gptq-{t}", work / f"ours-gptq-{t}.gguf"
        if not out.exists():
            if not ckpt.exists():
                run(*toolkit, "quantize", "int4", hf, "--target", f"gguf:{t}", *args.gptq_flags.split(), "--calib",
                    gptq_calib, "-o", ckpt, *threads)
            run(*toolkit, "export", "gguf", ckpt, "--outtype", t, "-o", out, *threads)
        rows.append(out)
    if not args.no_onnx_mnn:
        v1 = work / "gptq-v1-g32"
        if not v1.exists():
            run(*toolkit, "quantize", "int4", hf, "--group-size", "32", *args.gptq_flags.split(),
                *args.v1_flags.split(), "--calib", gptq_calib, "-o", v1, *threads)
        # ONNX Runtime's RTN (quantize --format onnx) vs the GPTQ codes in MatMulNBits (export onnx --variant ort of
        # the GPTQ checkpoint writes them as they are)
        made = {"onnx-int4-rtn": ["quantize", "int4", hf, "--format", "onnx"],
                "onnx-int4-gptq": ["export", "onnx", v1, "--variant", "ort"]}
        for name, cmd in made.items():
            if not (work / name).exists():
                run(*toolkit, *cmd, "-o", work / name, *threads)
            rows.append(work / name)
        for name, src in {"mnn-4bit-g32": hf, "mnn-4bit-gptq-g32": v1}.items():
            if not (work / name).exists():
                run(*toolkit, "export", "mnn", src, "--bits", "4", "--group-size", "32", "-o", work / name,
                    *threads)
            rows.append(work / name)
    rows += args.extra
    if args.files_only:
        return
    out = work / "parity"
    t0 = time.time()
    if not args.print_only:  # exit 1: a gate or a row failed; the table is written all the same
        run(*toolkit, "eval-parity", hf, *rows, "--text", text, "--ctx", "512", "--device", "cpu",
            "--repeats", str(args.repeats), "-o", out, "--force", ok=(0, 1))
    result = json.loads((out / "parity.json").read_text())
    print(f"eval-parity: {time.time() - t0:.0f} s; baseline PPL {result['baseline']['ppl']:.3f}, decode "
          f"{result['baseline']['decode_tps']:.1f} tok/s\n")
    print("| row | status | size MB | KLD | ΔPPL % | top-1 % | decode tok/s | × baseline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if r["status"] != "ok":
            print(f"| {r['name']} | {r['status']} | | | | | | |")
            continue
        print(f"| {r['name']} | ok | {r['size_bytes'] / 1e6:.1f} | {r['kld_mean']:.5f} | {r['ppl_delta_pct']:+.2f} | "
              f"{r['same_top_pct']:.1f} | {r['decode_tps']:.1f} ± {r['decode_tps_std']:.1f} | "
              f"{r['decode_ratio']:.3f} |")
    # ours vs llama.cpp's file of the same type, round by round (both timed in each round, a slow spell hits both)
    by_name = {Path(r["path"]).name: r for r in result["rows"] if r["status"] == "ok" and r.get("decode_rounds")}
    print("\n| ours / llama.cpp's file of the same type | decode, per round | median |")
    print("|---|---|---|")
    for name, r in by_name.items():
        kind = name.removesuffix(".gguf").split("-")
        theirs = next((by_name[f"llamacpp-{k}.gguf"] for k in kind if f"llamacpp-{k}.gguf" in by_name), None) \
            if kind[0] == "ours" else None
        if theirs:
            per = [a / b for a, b in zip(r["decode_rounds"], theirs["decode_rounds"])]
            print(f"| {name} | {' / '.join(f'{x:.2f}' for x in per)} | {statistics.median(per):.3f} |")


if __name__ == "__main__":
    main()

"""The same eval-parity table twice (issue 22): do the per-round decode ratios to the baseline agree between runs?

Rows, all of one model (--model smollm2: SmolLM2-135M-Instruct as tests/real_models.py writes it; mm26: the
benchmark model of ../shared/bench/PROTOCOL.md in ~/.cache/edge-toolkit/mm26; or --hf DIR):
- llama.cpp's own convert_hf_to_gguf.py at q8_0 (told MiniMind's pre-tokenizer, gpt-2, which its table of hashes
  lacks: bench/llamacpp_converter.py), and `toolkit export gguf --outtype q8_0`;
- onnxruntime-genai's own model builder at int4 (`-p int4 -e cpu`), scored in ONNX Runtime and in onnxruntime-genai;
- `toolkit quantize int4 --format onnx` (MatMulNBits from the ort export), in both engines too;
- `toolkit export mnn --bits 4` (MNN's LLM-engine folder), run by MNN.llm (--mnn; on by default).
Then `toolkit eval-parity` over them twice (text: the first --chars characters of WikiText-2 test for SmolLM2,
mm26's held-out text for mm26), and a table of each row's decode ratio to the baseline in both runs with their
relative difference.

    python bench/parity_rerun.py [--model smollm2|mm26] [--work DIR] [--chars 12000] [--repeats 3] [--no-mnn]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(*cmd, **kw) -> None:
    print("+", " ".join(map(str, cmd))[:200], flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, **kw)
    if proc.returncode not in (0, 1):  # eval-parity exits 1 on a breached gate; the table is still written
        raise SystemExit(f"failed ({proc.returncode}): {proc.stderr[-1500:]}")


def artifacts(hf: Path, work: Path, converter_pre: str | None, mnn: bool) -> list[Path]:
    from bench.llamacpp_converter import command

    work.mkdir(parents=True, exist_ok=True)
    py, toolkit = sys.executable, [sys.executable, "-m", "toolkit"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    made = {"llamacpp-q8_0.gguf": command(hf, "q8_0", work / "llamacpp-q8_0.gguf", pre=converter_pre),
            "ours-q8_0.gguf": [*toolkit, "export", "gguf", hf, "--outtype", "q8_0", "-o", work / "ours-q8_0.gguf",
                               "--threads", "2"],
            "builder-int4": [py, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", work / "builder-int4",
                             "-p", "int4", "-e", "cpu", "-c", work / "builder-cache"],
            "ours-onnx-int4": [*toolkit, "quantize", "int4", hf, "--format", "onnx", "-o", work / "ours-onnx-int4",
                               "--threads", "2"]}
    if mnn:
        made["ours-mnn-4bit"] = [*toolkit, "export", "mnn", hf, "--bits", "4", "-o", work / "ours-mnn-4bit",
                                 "--threads", "2"]
    for name, cmd in made.items():
        if not (work / name).exists():
            run(*cmd, env=env)
    return [work / name for name in made]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "mm26"], default="smollm2")
    ap.add_argument("--hf", type=Path, default=None, help="another Hugging Face folder (its text: WikiText-2)")
    ap.add_argument("--work", type=Path, default=None, help="default: ~/.cache/edge-toolkit/rerun[-mm26]")
    ap.add_argument("--no-mnn", dest="mnn", action="store_false", help="leave the MNN row out")
    ap.add_argument("--chars", type=int, default=12000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from tests.real_models import smollm2_hf_dir

    cache = Path.home() / ".cache" / "edge-toolkit"
    mm26 = args.model == "mm26" and args.hf is None
    hf = args.hf or (cache / "mm26" if mm26 else smollm2_hf_dir())
    args.work = args.work or cache / ("rerun-mm26" if mm26 else "rerun")
    arts = artifacts(hf, args.work / "artifacts", "gpt-2" if mm26 else None, args.mnn)
    text = args.work / "text.txt"
    source = hf / "heldout.txt" if mm26 else ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
    text.write_text(source.read_text()[:args.chars])
    results = []
    for k in (1, 2):
        t0 = time.time()
        out = args.work / f"run{k}"
        run(sys.executable, "-m", "toolkit", "eval-parity", hf, *arts, "--text", text, "--ctx", "512", "--device",
            "cpu", "--repeats", str(args.repeats), "-o", out, "--force")
        results.append(json.loads((out / "parity.json").read_text()))
        print(f"run {k}: {time.time() - t0:.0f} s", flush=True)
    first, second = results
    print(f"\nbaseline decode tok/s: run 1 {first['baseline']['decode_tps']:.1f} ± "
          f"{first['baseline']['decode_tps_std']:.1f}, run 2 {second['baseline']['decode_tps']:.1f} ± "
          f"{second['baseline']['decode_tps_std']:.1f}\n")
    print("| row | status | KLD | decode tok/s run 1 | run 2 | × baseline run 1 | run 2 | ratio difference |")
    print("|---|---|---|---|---|---|---|---|")
    for a, b in zip(first["rows"], second["rows"]):
        if a["status"] != "ok" or b["status"] != "ok":
            print(f"| {a['name']} | {a['status']} / {b['status']} | | | | | | |")
            continue
        diff = abs(b["decode_ratio"] / a["decode_ratio"] - 1) * 100
        print(f"| {a['name']} | ok | {a['kld_mean']:.4f} | {a['decode_tps']:.1f} ± {a['decode_tps_std']:.1f} | "
              f"{b['decode_tps']:.1f} ± {b['decode_tps_std']:.1f} | {a['decode_ratio']:.3f} ± "
              f"{a['decode_ratio_std']:.3f} | {b['decode_ratio']:.3f} ± {b['decode_ratio_std']:.3f} | {diff:.1f} % |")


if __name__ == "__main__":
    main()

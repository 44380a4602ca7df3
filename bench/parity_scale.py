"""eval-parity at real-model scale (issue 22, item 4): 6 rows over 50,000 tokens of WikiText-2 test, timed as a whole
and phase by phase, with each row's peak RSS as the report gives it.

Models: --model qwen05 (Qwen2.5-0.5B's shape with random weights, bench/synth_qwen.py, written once into
~/.cache/edge-toolkit/synth-qwen05) or smollm2 (SmolLM2-135M-Instruct as tests/real_models.py writes it).
Rows: `toolkit export gguf` f16, q8_0 and q4_k_m; onnxruntime-genai's model builder at int4 (`-p int4 -e cpu`),
scored in ONNX Runtime and in onnxruntime-genai; `toolkit export mnn --bits 4` in MNN.llm. The synthetic model's
4-bit files are written with --no-verify (random weights are not a model a 4-bit grid keeps: the verifier refuses
them, rightly). The baseline is computed afresh (a cache folder of the run's own).

    python bench/parity_scale.py [--model qwen05|smollm2] [--tokens 50000] [--work DIR] [--dtype auto]
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
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"
CACHE = Path.home() / ".cache" / "edge-toolkit"


def run(cmd: list, **kw) -> None:
    print("+", " ".join(map(str, cmd))[:220], flush=True)
    t0 = time.time()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {proc.stderr[-1500:]}")
    print(f"  {time.time() - t0:.1f} s", flush=True)


def artifacts(hf: Path, work: Path, synthetic: bool) -> list[Path]:
    work.mkdir(parents=True, exist_ok=True)
    py, toolkit = sys.executable, [sys.executable, "-m", "toolkit"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    unverified = ["--no-verify"] if synthetic else []
    made = {f"ours-{t}.gguf": [*toolkit, "export", "gguf", hf, "--outtype", t, "-o", work / f"ours-{t}.gguf",
                               *(unverified if t == "q4_k_m" else [])] for t in ("f16", "q8_0", "q4_k_m")}
    made["builder-int4"] = [py, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", work / "builder-int4",
                            "-p", "int4", "-e", "cpu", "-c", work / "builder-cache"]
    made["ours-mnn-4bit"] = [*toolkit, "export", "mnn", hf, "--bits", "4", "-o", work / "ours-mnn-4bit",
                             *unverified]
    for name, cmd in made.items():
        if not (work / name).exists():
            run(cmd, env=env)
    return [work / name for name in made]


def text_of(hf: Path, tokens: int, out: Path) -> int:
    """The shortest run of whole lines of WikiText-2 test with at least `tokens` tokens of the model's tokenizer."""
    from toolkit.core.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(hf)
    lines = WIKITEXT.read_text(encoding="utf-8").splitlines(keepends=True)
    lo, hi = 1, len(lines)
    while lo < hi:  # the fewest lines that reach `tokens`
        mid = (lo + hi) // 2
        if len(tok.encode("".join(lines[:mid]), add_bos=False)) >= tokens:
            hi = mid
        else:
            lo = mid + 1
    text = "".join(lines[:lo])
    out.write_text(text, encoding="utf-8")
    return len(tok.encode(text, add_bos=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["qwen05", "smollm2"], default="qwen05")
    ap.add_argument("--tokens", type=int, default=50_000)
    ap.add_argument("--work", type=Path, default=None, help="default: ~/.cache/edge-toolkit/scale-MODEL")
    ap.add_argument("--dtype", default="auto", help="the baseline's (eval-parity --dtype)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    synthetic = args.model == "qwen05"
    if synthetic:
        from bench.synth_qwen import write

        hf = CACHE / "synth-qwen05"
        if not (hf / "model.safetensors").is_file():
            write(hf)
    else:
        from tests.real_models import smollm2_hf_dir

        hf = smollm2_hf_dir()
    work = args.work or CACHE / f"scale-{args.model}"
    arts = artifacts(hf, work / "artifacts", synthetic)
    text = work / "text.txt"
    n_tokens = text_of(hf, args.tokens, text)
    out = work / f"report-{args.dtype}"
    cache = work / f"baseline-cache-{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [sys.executable, "-m", "toolkit", "eval-parity", hf, *arts, "--text", text, "--ctx", "512", "--device",
           "cpu", "--dtype", args.dtype, "--repeats", str(args.repeats), "-o", out, "--force"]
    print("+", " ".join(map(str, cmd)), flush=True)
    t0 = time.time()
    marks = []
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    for line in proc.stderr:
        marks.append((time.time() - t0, line.rstrip()))
        print(f"[{marks[-1][0]:7.1f} s] {line.rstrip()}", flush=True)
    code = proc.wait()
    total = time.time() - t0
    if code not in (0, 1):
        raise SystemExit(f"eval-parity failed ({code})")
    result = json.loads((out / "parity.json").read_text())
    base = result["baseline"]
    phases = phase_times(marks, total)
    print(f"\n{hf.name}: {base['n_tokens']} tokens ({n_tokens} asked {args.tokens}), {base['n_scored']} scored, "
          f"{len(result['rows'])} rows, {total:.0f} s in all ({total / 60:.1f} min); baseline {base['dtype']}")
    print("| phase | seconds |\n|---|---|")
    for name, secs in phases:
        print(f"| {name} | {secs:.0f} |")
    print("\n| row | status | scoring s | scored tok/s | KLD | same top % | scoring peak RSS MB | timing peak RSS MB "
          "| decode tok/s | decode × baseline |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        if r["status"] != "ok":
            print(f"| {r['name']} | {r['status']}: {r['error']} | | | | | | | | |")
            continue
        print(f"| {r['name']} | ok | {r['seconds']:.0f} | {base['n_tokens'] / r['seconds']:.0f} | "
              f"{r['kld_mean']:.4g} | {r['same_top_pct']:.2f} | {r['peak_rss_bytes'] / 1e6:.0f} | "
              f"{r['timing_peak_rss_bytes'] / 1e6:.0f} | "
              f"{r['decode_tps']:.1f} ± {r['decode_tps_std']:.1f} | {r['decode_ratio']:.3f} |")
    (work / f"scale-{args.dtype}.json").write_text(json.dumps({"phases": phases, "total_s": total,
                                                               "log": marks}, indent=1))


def phase_times(marks: list[tuple[float, str]], total: float) -> list[tuple[str, float]]:
    """Seconds between eval-parity's own log lines: the baseline, each scored row, the timing rounds."""
    starts = [(t, line) for t, line in marks if line.startswith(("baseline:", "[", "timing round 1/"))]
    out, prev_t, prev_name = [], 0.0, "baseline (tokenize, reference model, record)"
    for t, line in starts:
        out.append((prev_name, t - prev_t))
        prev_t = t
        prev_name = ("rows: " + line.split("] ", 1)[1][:80]) if line.startswith("[") else \
            ("timing rounds" if line.startswith("timing") else "after the baseline")
    out.append((prev_name, total - prev_t))
    return [(n, s) for n, s in out if n != "after the baseline" or s > 1]


if __name__ == "__main__":
    main()

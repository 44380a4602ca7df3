"""`toolkit eval-parity`: the baseline (reference model, fp16 on CUDA or fp32 on CPU) and every artifact on the same
tokens, scored as llama-perplexity scores them (non-overlapping chunks of ctx tokens, the second half of each
scored, BOS written over each chunk's first token when the tokenizer adds one), each artifact in a fresh process.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from toolkit.core import manifest
from toolkit.core.errors import ToolkitError
from toolkit.core.targets import all_cores

SCHEMA = 1
BENCH_PROMPT, BENCH_NEW = 512, 128  # llama-bench's pp512 / tg128
ROW_TIMEOUT = 1800
TOKENIZER_CHARS = 20_000  # of the scored text, tokenized by each row's own tokenizer and compared
RECORD_VERSION = 2  # of the cached baseline record: 2 = log-probs from float32 exponentials summed in float64
FLOOR_CHUNKS = 4  # chunks a baseline in less than float32 is also scored on in float32 (its own distance)
TORCH_DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class ParityOptions:
    ckpt: Path
    artifacts: list[Path]
    text: Path | None = None
    ctx: int = 512
    device: str = "auto"
    dtype: str = "auto"  # the baseline's: auto = float16 on CUDA, float32 on the CPU
    threads: int = 1  # timing threads (decode speed: 1 on these machines)
    repeats: int = 3  # interleaved timing rounds
    max_kld: float | None = None
    max_ppl_delta: float | None = None
    cache_dir: Path | None = None
    overrides: dict = field(default_factory=dict)
    with_runtimes: list[str] = field(default_factory=list)  # rows of the checkpoint itself in these runtimes (bnb)
    score_threads: int | None = None  # scoring threads (None: every core); timing keeps `threads`

# --with names -> runtimes that quantize the checkpoint in memory
def with_runtimes(names: str | None) -> list[str]:
    """`--with a,b`: the runtimes that run the checkpoint itself as extra rows (declared with a with_name, e.g.
    bitsandbytes' in-memory quantizers), refused by name when unknown or not installed."""
    import runtimes

    offered = {spec.with_name: spec for spec in runtimes.declared() if spec.with_name}
    chosen = []
    for name in [n.strip() for n in (names or "").split(",") if n.strip()]:
        if name not in offered:
            raise ToolkitError(f"unknown --with '{name}'", f"choose from: {', '.join(offered)}")
        spec = offered[name]
        if not runtimes.installed(spec):
            raise ToolkitError(f"--with {name} needs {spec.engine}, which is not installed",
                               f"pip install 'edge-toolkit[{spec.extra or spec.engine}]'")
        chosen.append(spec.name)
    return chosen


def read_text(path: Path) -> str:
    if not path.is_file():
        raise ToolkitError(f"text file {path} does not exist", "pass --text FILE (default: the checkpoint's "
                                                               "heldout.txt)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ToolkitError(f"{path} is not UTF-8 text (byte {e.start})", "convert it to UTF-8") from None
    if not text.strip():
        raise ToolkitError(f"{path} is empty", "give a text of at least two chunks of --ctx tokens")
    return text


def checkpoint_hash(ckpt: Path) -> str:
    return manifest.source_sha256(ckpt)


def cache_root(explicit: Path | None) -> Path:
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge-toolkit" / "parity"


def resolve_device(device: str, dtype: str = "auto") -> tuple[str, str]:
    """(device, baseline dtype). auto: float16 on CUDA, float32 on the CPU, where bfloat16 is twice as fast but
    its own KLD from float32 (7.8e-4 on SmolLM2-135M) is as large as a q8_0 file's (docs/BENCHMARKS.md)."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ToolkitError(f"unknown device '{device}'", "use --device auto, cpu or cuda")
    if dtype not in ("auto", *TORCH_DTYPE_NAMES):
        raise ToolkitError(f"unknown baseline dtype '{dtype}'", f"use auto, {', '.join(TORCH_DTYPE_NAMES)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("--device cuda but no CUDA device is visible", "use --device cpu")
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if dtype == "auto":
        dtype = "float16" if on_cuda else "float32"
    return ("cuda" if on_cuda else "cpu"), dtype


def runtime_for(artifact: Path) -> str | None:
    from runtimes import handling

    return handling(artifact)


def beside_runtimes(artifact: Path) -> list[str]:
    """Runtimes that also score every artifact they open, as rows of their own (onnxruntime-genai beside ONNX
    Runtime for folders with genai_config.json)."""
    from runtimes import registry

    return [spec.name for spec in registry().values() if spec.beside and spec.handles(artifact)]


def artifact_size(artifact: Path) -> int:
    if artifact.is_file():
        return artifact.stat().st_size
    weights = [p for p in artifact.iterdir() if p.name.startswith(("model.onnx", "embeddings."))
               or p.suffix in (".safetensors", ".bin", ".mnn", ".weight", ".pth")]  # .weight: MNN engine folders
    return sum(p.stat().st_size for p in weights)


def bnb_weight_bytes(bundle, runtime: str) -> int:
    """Weight bytes bitsandbytes holds in memory: the decoder's linear layers at 8 bits (+ an fp32 scale per row)
    or NF4 (4 bits + a double-quantized absmax per 64: 8 bits per block, fp32 per 256 blocks); the rest as stored."""
    from quant.checkpoint import quantized_linears

    linears = set(quantized_linears(bundle))
    total = 0
    for name, ref in bundle.tensors.items():
        n = ref.numel
        if name not in linears:
            total += n * ref.itemsize
        elif runtime == "bnb_int8":
            total += n + 4 * ref.shape[0]
        else:
            total += n // 2 + n // 64 + 4 * (n // (64 * 256) + 1)
    return total


def artifact_format(artifact: Path, runtime: str | None) -> str:
    """How the report names an artifact's format: as its runtime describes it."""
    from runtimes import registry

    return registry()[runtime].describe(artifact) if runtime in registry() else "unknown"


def reference_logits_batches(model, chunks: np.ndarray, device: str, batch: int = 4):
    """(first chunk index, float32 logits [b, scored, vocab]) of the reference model, `batch` chunks at a time; the
    output head runs only from the first scored position on (a quarter of a 0.5B model's compute at a 150K vocab)."""
    import torch

    from toolkit.core.perplexity import scored_positions

    ctx = chunks.shape[1]
    scored = scored_positions(ctx)
    with torch.no_grad():
        for start in range(0, len(chunks), batch):
            ids = torch.from_numpy(chunks[start:start + batch]).to(device)
            yield start, model(ids, logits_from=scored.start)[:, :scored.stop - scored.start].float()


def compute_baseline(bundle, chunks: np.ndarray, device: str, dtype: str, progress=None):
    """The baseline record of every scored position from the reference model; the top-k ids come from torch.topk
    (threaded; numpy's argpartition over a 150K vocabulary took as long as the model)."""
    import torch

    from toolkit.app.parity.metrics import TOP_K, BaselineRecord
    from toolkit.core.model import build_model
    from toolkit.core.perplexity import scored_positions

    model = build_model(bundle, getattr(torch, dtype), device)
    first = scored_positions(chunks.shape[1]).start
    records = []
    for start, logits in reference_logits_batches(model, chunks, device):
        top = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices.cpu().numpy()
        for j, rows in enumerate(logits.cpu().numpy()):
            records.append(BaselineRecord.from_logits(rows, chunks[start + j, first + 1:], top_ids=top[j]))
        if progress:
            progress(min(start + len(logits), len(chunks)), len(chunks))
    return BaselineRecord.concat(records)


def baseline_floor(bundle, chunks: np.ndarray, record, device: str) -> dict:
    """A baseline below float32 judged on its first FLOOR_CHUNKS chunks by the float32 model scored as a row
    against it: what an artifact computing exactly the float32 logits would score. Rows' figures at this level say
    nothing (the baseline's own rounding); docs/BENCHMARKS.md has what bfloat16 costs on the CPU."""
    import torch

    from toolkit.app.parity.metrics import Comparison, compare_rows, summarize
    from toolkit.core.model import build_model

    model = build_model(bundle, torch.float32, device)
    parts = []
    for start, logits in reference_logits_batches(model, chunks[:FLOOR_CHUNKS], device):
        for j, rows in enumerate(logits.cpu().numpy()):
            per = len(rows)
            parts.append(compare_rows(rows, record.slice((start + j) * per, (start + j + 1) * per)))
    c = Comparison.concat(parts)
    figures = summarize(c, float(-record.target_logp[:len(c.nll)].mean()), 0)
    return {"chunks": len(parts), **{k: figures[k] for k in ("kld_mean", "kld_p99", "same_top_pct",
                                                             "ppl_delta_pct")}}


def run_row(artifact: Path, runtime: str, spec: dict, work: Path, index, mode: str = "score") -> dict:
    """One job of an artifact in a fresh process (`mode` score or time); a failure becomes a failed row with the
    worker's last stderr line."""
    out = work / f"{mode}{index}.json"
    spec = {**spec, "artifact": str(artifact), "runtime": runtime, "out": str(out), "mode": mode}
    spec_path = work / f"{mode}{index}.spec.json"
    spec_path.write_text(json.dumps(spec))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "toolkit.app.parity.worker", str(spec_path)], capture_output=True,
                              text=True, timeout=ROW_TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {ROW_TIMEOUT} s"}
    if proc.returncode != 0 or not out.is_file():
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit code {proc.returncode}"
        return {"status": "failed", "error": reason.removeprefix("error: ")}
    row = json.loads(out.read_text())
    row["status"], row["error"], row["seconds"] = "ok", None, time.perf_counter() - t0
    return row


def time_rounds(jobs: list[tuple], spec: dict, work: Path, repeats: int, log=print) -> dict:
    """Decode and prefill speed in interleaved rounds: each round times every job once, each in a fresh process
    (the order reversed every other round), so a slow spell of the shared machine lands on all of them. Per job:
    median ± std of tok/s, and the median ± std of its per-round decode ratio to the first job (the baseline).
    jobs: (key, artifact, runtime, extra spec). A job that fails a round is reported with its reason."""
    runs: dict = {key: [] for key, *_ in jobs}
    failed: dict = {}
    for r in range(repeats):
        order = jobs if r % 2 == 0 else jobs[::-1]
        log(f"timing round {r + 1}/{repeats}: {len(order)} rows")
        for key, artifact, runtime, extra in order:
            if key in failed:
                continue
            got = run_row(artifact, runtime, {**spec, **extra}, work, f"{key}-{r}", mode="time")
            if got["status"] != "ok":
                failed[key] = got["error"]
            else:
                runs[key].append(got)
    reference = runs[jobs[0][0]]
    out = {}
    for key, *_ in jobs:
        if key in failed:
            out[key] = {"status": "failed", "error": f"timing: {failed[key]}"}
            continue
        pre, dec = [g["prefill_tps"] for g in runs[key]], [g["decode_tps"] for g in runs[key]]
        ratios = [g["decode_tps"] / b["decode_tps"] for g, b in zip(runs[key], reference)] if reference else []
        (p, p_std), (d, d_std) = median_std(pre), median_std(dec)
        ratio, ratio_std = median_std(ratios) if ratios else (None, None)
        out[key] = {"prefill_tps": p, "prefill_tps_std": p_std, "decode_tps": d, "decode_tps_std": d_std,
                    "decode_ratio": ratio, "decode_ratio_std": ratio_std, "decode_rounds": dec,
                    "label": runs[key][0]["label"], "timing_peak_rss_bytes": max(g["peak_rss_bytes"]
                                                                                 for g in runs[key])}
    return out


def median_std(xs: list[float]) -> tuple[float, float]:
    import statistics

    return statistics.median(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def evaluate(opts: ParityOptions, progress=None, log=print) -> dict:
    """Everything but writing the report: the baseline (cached) and one row per artifact."""
    from toolkit.app.parity.metrics import BaselineRecord
    from toolkit.checkpoints import load_checkpoint
    from toolkit.core.perplexity import chunks as make_chunks
    from toolkit.core.perplexity import summarize as ppl_summary

    if opts.ctx < 16 or opts.ctx % 2:
        raise ToolkitError(f"--ctx {opts.ctx} must be an even number of at least 16", "use --ctx 512 or 256")
    for a in opts.artifacts:
        if not a.exists():
            raise ToolkitError(f"artifact {a} does not exist", "check the path")
    text_path = opts.text
    if text_path is None:
        text_path = opts.ckpt / "heldout.txt" if opts.ckpt.is_dir() else None
        if text_path is None or not text_path.is_file():
            raise ToolkitError(f"{opts.ckpt} has no heldout.txt", "pass --text FILE")
    text = read_text(text_path)
    device, dtype = resolve_device(opts.device, opts.dtype)
    bundle = load_checkpoint(opts.ckpt, **opts.overrides)
    tok = bundle.tokenizer
    tokens = tok.encode(text, add_bos=False)
    if len(tokens) < 2 * opts.ctx:
        raise ToolkitError(f"{text_path} has {len(tokens)} tokens, fewer than two chunks of --ctx {opts.ctx}",
                           "give a longer text or a smaller --ctx")
    bos = tok.bos_id if tok.add_bos else None
    chunks = np.asarray(make_chunks(tokens, opts.ctx, bos), np.int32)
    ctx = opts.ctx
    n_bytes = sum(len(tok.decode([int(t) for t in c[ctx // 2 + 1:]]).encode("utf-8")) for c in chunks)
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    key = hashlib.sha256(f"{checkpoint_hash(opts.ckpt)}|{text_sha}|{ctx}|{device}|{dtype}|r{RECORD_VERSION}"
                         .encode()).hexdigest()[:24]
    cache = cache_root(opts.cache_dir) / f"{key}.npz"
    floor_file = cache.with_suffix(".floor.json")
    cached = cache.is_file() and (dtype == "float32" or floor_file.is_file())
    if cached:
        record = BaselineRecord.load(cache)
    else:
        ids = chunks.astype(np.int64)  # torch's embedding index type, for the baseline and its float32 check
        record = compute_baseline(bundle, ids, device, dtype, progress)
        cache.parent.mkdir(parents=True, exist_ok=True)
        if dtype != "float32":
            log(f"the baseline's own distance from float32, on {min(FLOOR_CHUNKS, len(chunks))} chunks")
            floor_file.write_text(json.dumps(baseline_floor(bundle, ids, record, device)))
        tmp = cache.with_name(cache.name + f".partial-{os.getpid()}.npz")
        record.save(tmp)
        os.replace(tmp, cache)
    floor = json.loads(floor_file.read_text()) if dtype != "float32" else None
    nll = -record.target_logp  # the baseline's NLL per scored position
    base = ppl_summary(nll, len(tokens), ctx)
    prompt = [int(t) for t in chunks.reshape(-1)[:min(BENCH_PROMPT, bundle.config.max_position_embeddings - BENCH_NEW)]]
    log(f"baseline: torch {dtype} {device}, PPL {base.ppl:.4f} over {base.n_scored} scored tokens "
        f"({'cached' if cached else 'computed'}: {cache})")
    n_params = bundle.num_parameters()
    baseline = {"runtime": "torch", "device": device, "dtype": dtype, "ppl": base.ppl, "ppl_err": base.ppl_err,
                "bpb": float(nll.sum() / np.log(2) / n_bytes), "n_tokens": len(tokens), "n_scored": base.n_scored,
                "ctx": ctx, "text": str(text_path), "text_sha256": text_sha, "cache": str(cache),
                "size_bytes": artifact_size(opts.ckpt), "n_params": n_params,
                "bench": f"pp{len(prompt)} tg{BENCH_NEW}", "floor": floor}
    rows = []
    with tempfile.TemporaryDirectory(prefix="toolkit-parity-") as tmpdir:
        work = Path(tmpdir)
        np.save(work / "tokens.npy", chunks)
        # every row scores the checkpoint's token ids; each also says whether its own tokenizer makes the same ids
        sample = text[:TOKENIZER_CHARS]
        spec = {"tokens": str(work / "tokens.npy"), "baseline": str(cache), "threads": opts.threads,
                "score_threads": opts.score_threads or all_cores(), "device": device,
                "bench_prompt": len(prompt), "bench_new": BENCH_NEW, "baseline_nll_mean": float(nll.mean()),
                "n_bytes": n_bytes, "tokenizer_text": sample, "tokenizer_ids": tok.encode(sample, add_bos=False)}
        # the loader options were given for the checkpoint: they reach the jobs that load it (baseline timing,
        # --with rows), not the artifacts, which carry their own tokenizer and config
        own = {"overrides": {k: str(v) if isinstance(v, Path) else v for k, v in opts.overrides.items()}}
        items = []
        for artifact in opts.artifacts:
            first = runtime_for(artifact)
            items += [(artifact, first)] + [(artifact, name) for name in beside_runtimes(artifact) if name != first]
        items += [(opts.ckpt, r) for r in opts.with_runtimes]
        for i, (artifact, runtime) in enumerate(items):
            if runtime in opts.with_runtimes:
                row = {"name": f"{artifact.name} ({runtime})", "runtime": runtime,
                       "format": f"bitsandbytes {runtime.removeprefix('bnb_')}", "path": str(artifact),
                       "size_bytes": bnb_weight_bytes(bundle, runtime)}
            else:
                beside = runtime != runtime_for(artifact)
                row = {"name": f"{artifact.name} ({runtime})" if beside else artifact.name, "runtime": runtime,
                       "format": artifact_format(artifact, runtime),
                       "path": str(artifact), "size_bytes": artifact_size(artifact)}
            row["bits_per_weight"] = 8.0 * row["size_bytes"] / n_params
            log(f"[{i + 1}/{len(items)}] {artifact} ({runtime or 'no runtime'})")
            if runtime is None:
                row.update(status="failed", error="no installed runtime opens this artifact")
            else:
                row.update(run_row(artifact, runtime, {**spec, **(own if artifact == opts.ckpt else {})}, work, i))
            check = row.get("tokenizer")
            if check and not check["same"] and check.get("ours") is not None:
                check["ours_text"] = tok.decode([check["ours"]])
            rows.append(row)
        # speed last, in rounds over the baseline and every row that scored
        jobs = [("baseline", opts.ckpt, "torch", {"load_options": {"dtype": dtype}, **own})]
        jobs += [(str(i), items[i][0], row["runtime"], own if items[i][0] == opts.ckpt else {})
                 for i, row in enumerate(rows) if row["status"] == "ok"]
        timing = time_rounds(jobs, spec, work, opts.repeats, log)
        if timing["baseline"].get("status") == "failed":
            raise ToolkitError(f"the baseline could not be timed: {timing['baseline']['error']}",
                               "rerun with --debug; check the checkpoint loads with `toolkit generate`")
        baseline.update(timing.pop("baseline"))
        for key, figures in timing.items():
            rows[int(key)].update(figures)
    return {"schema": SCHEMA, "checkpoint": str(opts.ckpt), "baseline": baseline, "rows": rows,
            "gates": {"max_kld": opts.max_kld, "max_ppl_delta_pct": opts.max_ppl_delta},
            "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "threads": opts.threads, "score_threads": spec["score_threads"], "repeats": opts.repeats,
            "timing": "interleaved rounds, one fresh process per row and round; ratios to the baseline per round"}


def machine_info() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def breaches(result: dict) -> list[str]:
    """Rows that failed or break a gate, as one line each."""
    out = []
    gates = result["gates"]
    for row in result["rows"]:
        if row["status"] != "ok":
            out.append(f"{row['name']}: failed ({row['error']})")
            continue
        if row.get("tokenizer") and not row["tokenizer"]["same"]:
            from toolkit.app.parity.metrics import tokenizer_difference

            out.append(f"{row['name']}: {tokenizer_difference(row['tokenizer'])}")
        if gates["max_kld"] is not None and row["kld_mean"] > gates["max_kld"]:
            out.append(f"{row['name']}: mean KLD {row['kld_mean']:.6f} > --max-kld {gates['max_kld']}")
        if gates["max_ppl_delta_pct"] is not None and row["ppl_delta_pct"] > gates["max_ppl_delta_pct"]:
            out.append(f"{row['name']}: PPL {row['ppl_delta_pct']:+.3f} % > --max-ppl-delta "
                       f"{gates['max_ppl_delta_pct']} %")
    return out

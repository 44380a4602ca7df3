"""One eval-parity job in a fresh process: `python -m toolkit.app.parity.worker SPEC.json`.

The artifact is loaded the way a user loads it (its runtime, its own file). SPEC's "mode":
- score: on the tokens the parent wrote, against the parent's baseline record, at "score_threads"; and whether the
  artifact's own tokenizer makes the checkpoint's ids;
- time: one timed generation at "threads" (llama-bench's pp512 / tg128 shape) after a warm-up; the parent runs
  these in interleaved rounds over all rows (parity.time_rounds).
The process imports only its own engine, so its peak RSS is the artifact's, not the harness's. Writes the figures to
SPEC's "out".
"""
from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np


def peak_rss_bytes() -> int:
    """This process's high-water RSS. /proc's VmHWM starts afresh at exec; getrusage's ru_maxrss would carry the
    parent's (the harness, torch loaded) into the child on Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def tokenizer_check(rt, text: str, want: list[int]) -> dict:
    """Whether the artifact tokenizes the scored text as the checkpoint does (its runtime's own tokenizer: a GGUF's
    vocabulary, a folder's tokenizer.json). A leading BOS the runtime adds is not a difference."""
    from toolkit.core.verify import first_difference

    got = list(rt.prompt_ids(text))
    if got[1:] == want and got[:1] != want[:1]:
        got = got[1:]
    if got == want:
        return {"same": True, "checked_tokens": len(want)}
    i = first_difference(want, got)
    theirs = got[i] if i < len(got) else None
    return {"same": False, "checked_tokens": len(want), "index": i, "ours": want[i] if i < len(want) else None,
            "theirs": theirs, "theirs_text": rt.detokenize([theirs]) if theirs is not None else ""}


def run(spec: dict) -> dict:
    from runtimes import RUNTIMES

    chunks = np.load(spec["tokens"])
    ctx = chunks.shape[1]
    prompt = [int(t) for t in chunks.reshape(-1)[:spec["bench_prompt"]]]
    runtime = RUNTIMES[spec["runtime"]]
    # artifacts run on the baseline's device where their runtime can; otherwise on the CPU (the row says which)
    device = spec["device"] if spec["device"] == "cpu" or runtime.on_cuda() else "cpu"
    threads = spec["threads"] if spec["mode"] == "time" else spec["score_threads"]
    t0 = time.perf_counter()
    rt = runtime.load(spec["artifact"], threads=threads, device=device,
                      ctx=max(ctx, len(prompt) + spec["bench_new"] + 8),
                      **spec.get("overrides", {}), **spec.get("load_options", {}))
    load_seconds = time.perf_counter() - t0
    row = time_once(rt, prompt, spec["bench_new"]) if spec["mode"] == "time" else score(rt, spec, chunks)
    row.update(load_seconds=load_seconds, device=device, label=getattr(rt, "label", spec["runtime"]),
               peak_rss_bytes=peak_rss_bytes(), peak_vram_bytes=None)
    if "torch" in sys.modules and device == "cuda":
        import torch

        row["peak_vram_bytes"] = int(torch.cuda.max_memory_allocated())
    return row


def score(rt, spec: dict, chunks: np.ndarray) -> dict:
    from toolkit.app.parity.metrics import BaselineRecord, Comparison, compare_rows, summarize
    from toolkit.core.perplexity import scored_positions

    tokenizer = tokenizer_check(rt, spec["tokenizer_text"], spec["tokenizer_ids"])
    ctx = chunks.shape[1]
    base = BaselineRecord.load(spec["baseline"])
    first = scored_positions(ctx).start
    per = ctx - 1 - first
    parts = []
    for i, chunk in enumerate(chunks):
        rows = scored_logits(rt, [int(t) for t in chunk], first)[:per]
        parts.append(compare_rows(rows, base.slice(i * per, (i + 1) * per)))
    row = summarize(Comparison.concat(parts), spec["baseline_nll_mean"], spec["n_bytes"])
    row["tokenizer"] = tokenizer
    row["bench"] = f"pp{spec['bench_prompt']} tg{spec['bench_new']}"
    return row


def scored_logits(rt, token_ids: list[int], first: int) -> np.ndarray:
    """Logits from position `first` on: only those where the engine can compute just them (llama.cpp's output
    flags), else all of them, sliced."""
    if hasattr(rt, "logits_from"):
        return rt.logits_from(token_ids, first)
    return np.asarray(rt.logits(token_ids))[first:]


def time_once(rt, prompt: list[int], new_tokens: int) -> dict:
    """A warm-up at the timed length (first-call allocations, a CUDA graph for that cache size), then one timed
    greedy generation."""
    from toolkit.core.sampling import make_sampler

    greedy = make_sampler(0.0)
    rt.generate(prompt, 4, greedy)
    g = rt.generate(prompt, new_tokens, greedy)
    return {"prefill_tps": g.prefill_tps, "decode_tps": g.decode_tps}


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    try:
        row = run(spec)
    except Exception as e:  # the parent reports the reason in the row; one line is enough there
        from toolkit.core.errors import ToolkitError

        first = (str(e).splitlines() or [""])[0][:300]
        line = e.line() if isinstance(e, ToolkitError) else f"error: {type(e).__name__}: {first}"
        print(line, file=sys.stderr)
        sys.exit(1)
    with open(spec["out"], "w") as f:
        json.dump(row, f)


if __name__ == "__main__":
    main()

"""One eval-parity row in a fresh process: `python -m toolkit.app.parity.worker SPEC.json`.

The artifact is loaded the way a user loads it (its runtime, its own file), scored on the tokens the parent wrote
against the parent's baseline record, then timed (llama-bench's pp512 / tg128 shape). The process imports only its
own engine, so its peak RSS is the artifact's, not the harness's. Writes the row's figures to SPEC's "out".
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
    got = list(rt.prompt_ids(text))
    if got[1:] == want and got[:1] != want[:1]:
        got = got[1:]
    if got == want:
        return {"same": True, "checked_tokens": len(want)}
    i = next(k for k, (a, b) in enumerate(zip(want + [-1], got + [-2])) if a != b)
    theirs = got[i] if i < len(got) else None
    return {"same": False, "checked_tokens": len(want), "index": i, "ours": want[i] if i < len(want) else None,
            "theirs": theirs, "theirs_text": rt.detokenize([theirs]) if theirs is not None else ""}


def run(spec: dict) -> dict:
    from runtimes import RUNTIMES
    from toolkit.app.parity.metrics import BaselineRecord, Comparison, compare_rows, summarize
    from toolkit.app.parity.speed import time_generation
    from toolkit.core.perplexity import scored_positions

    chunks = np.load(spec["tokens"])
    ctx = chunks.shape[1]
    base = BaselineRecord.load(spec["baseline"])
    prompt = [int(t) for t in chunks.reshape(-1)[:spec["bench_prompt"]]]
    runtime = RUNTIMES[spec["runtime"]]
    # artifacts run on the baseline's device where their runtime can; otherwise on the CPU (the row says which)
    device = spec["device"] if spec["device"] == "cpu" or runtime.on_cuda() else "cpu"
    t0 = time.perf_counter()
    rt = runtime.load(spec["artifact"], threads=spec["threads"], device=device,
                      ctx=max(ctx, len(prompt) + spec["bench_new"] + 8))
    load_seconds = time.perf_counter() - t0
    tokenizer = tokenizer_check(rt, spec["tokenizer_text"], spec["tokenizer_ids"])
    per = ctx - 1 - ctx // 2
    parts = []
    for i, chunk in enumerate(chunks):
        rows = np.asarray(rt.logits([int(t) for t in chunk]))[scored_positions(ctx)]
        parts.append(compare_rows(rows, base.slice(i * per, (i + 1) * per)))
    row = summarize(Comparison.concat(parts), spec["baseline_nll_mean"], spec["n_bytes"])
    row.update(time_generation(rt, prompt, spec["bench_new"], spec["repeats"]))
    row["bench"] = f"pp{len(prompt)} tg{spec['bench_new']}"
    row["load_seconds"] = load_seconds
    row["tokenizer"] = tokenizer
    row["device"] = device
    row["label"] = getattr(rt, "label", spec["runtime"])
    row["peak_rss_bytes"] = peak_rss_bytes()
    row["peak_vram_bytes"] = None
    if "torch" in sys.modules and device == "cuda":
        import torch

        row["peak_vram_bytes"] = int(torch.cuda.max_memory_allocated())
    return row


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

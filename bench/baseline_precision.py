"""What the baseline's precision costs and changes on the CPU (issue 22, item 4): the reference model scored in
float32, bfloat16 and float16 on the same chunks as eval-parity scores them.

Per variant: seconds per chunk (median of interleaved rounds, each variant once per round) and its figures against
the float32 baseline (mean KLD, same-top-token rate, PPL difference) — which is the floor under any row scored
against that variant instead of float32.

    python bench/baseline_precision.py HF_DIR [--text FILE] [--chars 60000] [--chunks 24] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"


def main() -> None:
    import torch

    from toolkit.app.parity.metrics import BaselineRecord, Comparison, compare_rows
    from toolkit.checkpoints import load_checkpoint
    from toolkit.core.model import build_model
    from toolkit.core.perplexity import chunks as make_chunks
    from toolkit.core.perplexity import scored_positions

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf", type=Path)
    ap.add_argument("--text", type=Path, default=WIKITEXT)
    ap.add_argument("--chars", type=int, default=60000)
    ap.add_argument("--chunks", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_checkpoint(args.hf)
    tok = bundle.tokenizer
    ids = tok.encode(args.text.read_text()[:args.chars], add_bos=False)
    chunks = np.asarray(make_chunks(ids, args.ctx, tok.bos_id if tok.add_bos else None), np.int64)[:args.chunks]
    print(f"{args.hf}: {bundle.num_parameters():,} parameters, {len(chunks)} chunks of {args.ctx}, "
          f"{args.threads} threads, torch {torch.__version__}", flush=True)
    fp32 = build_model(bundle, torch.float32)
    bf16 = build_model(bundle, torch.bfloat16)
    variants = {"float32": fp32, "bfloat16": bf16, "float16": build_model(bundle, torch.float16)}
    seconds = {k: [] for k in variants}
    records = {k: [] for k in variants}
    scored = scored_positions(args.ctx)
    for r, start in enumerate(range(0, len(chunks), args.batch)):
        batch = torch.from_numpy(chunks[start:start + args.batch])
        names = list(variants) if r % 2 == 0 else list(variants)[::-1]
        for name in names:
            model = variants[name]
            t0 = time.perf_counter()
            with torch.no_grad():
                logits = model(batch)
            seconds[name].append((time.perf_counter() - t0) / len(batch))
            for j, row in enumerate(logits.float().numpy()):
                records[name].append((row[scored], chunks[start + j, args.ctx // 2 + 1:]))
    base = BaselineRecord.concat([BaselineRecord.from_logits(rows, t) for rows, t in records["float32"]])
    print("| baseline | s per chunk | × float32 time | mean KLD vs float32 | p99 KLD | same top % | PPL Δ % |")
    print("|---|---|---|---|---|---|---|")
    t32 = statistics.median(seconds["float32"])
    per = args.ctx - 1 - args.ctx // 2
    for name in variants:
        c = Comparison.concat([compare_rows(rows, base.slice(i * per, (i + 1) * per))
                               for i, (rows, _) in enumerate(records[name])])
        t = statistics.median(seconds[name])
        ppl = 100 * (np.exp(c.nll.mean() + base.target_logp.mean()) - 1)
        print(f"| {name} | {t:.3f} | {t / t32:.2f} | {c.kld.mean():.2e} | {np.percentile(c.kld, 99):.2e} | "
              f"{100 * c.same_top.mean():.2f} | {ppl:+.4f} |", flush=True)


if __name__ == "__main__":
    main()

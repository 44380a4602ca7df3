#!/usr/bin/env python3
"""GPU decode speed: this toolkit's fp16 decoder (eager; CUDA graph of torch ops; CUDA graph of our Triton kernels, the
runtime's default, and the same kernels without programmatic dependent launch; CUDA graph + torch.compile) next to
Hugging Face transformers `generate` (eager and static cache) on the same checkpoint, in the same run, on one GPU.

PROTOCOL.md's shape: batch 1, a 64-token prompt, 128 greedy tokens; median ± std of --runs runs after a warm-up;
decode tok/s excludes the prefill (transformers: time(128 new) − time(1 new), over 127 tokens). Also prints the share
of the bandwidth roof: tok/s × weight bytes read per token ÷ the device-to-device copy bandwidth measured here.

    python bench/cuda_decode.py CKPT [CKPT ...] [--runs 5] [--no-compile] [--no-transformers] [--profile]
                                [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtimes.torch_runtime.runtime import TorchRuntime  # noqa: E402
from runtimes.torch_runtime.static_decode import GraphDecoder, capacity_for  # noqa: E402
from toolkit.checkpoints import load_checkpoint  # noqa: E402
from toolkit.core.sampling import make_sampler  # noqa: E402

try:
    from runtimes.torch_runtime import triton_gemv
except ImportError:  # no Triton: the fused rows are skipped by the runtime anyway
    triton_gemv = None


def med_std(xs):
    return statistics.median(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 2 GiB device-to-device copy (median of 20)."""
    a = torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(22):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * (1 << 30) * 2 / statistics.median(times[2:])


def weight_bytes_per_token(bundle) -> int:
    """fp16 bytes of every weight a decode step reads: all of them, the embedding's one row aside (a tied
    embedding is read whole as the output head)."""
    cfg = bundle.config
    total = 2 * bundle.num_parameters()
    if not cfg.tie_word_embeddings:
        total -= 2 * cfg.vocab_size * cfg.hidden_size
    return total


def prompt_for(ckpt: Path, bundle, n: int) -> list[int]:
    held = ckpt / "heldout.txt"
    if held.is_file():
        ids = bundle.tokenizer.encode(held.read_text(encoding="utf-8"), add_bos=False)
        if len(ids) >= n:
            return ids[:n]
    return np.random.default_rng(0).integers(3, bundle.config.vocab_size, n).tolist()


def time_ours(rt: TorchRuntime, prompt, new, runs, sampler) -> dict:
    rt.generate(prompt, 4, sampler)
    pre, dec, ids = [], [], None
    for _ in range(runs):
        g = rt.generate(prompt, new, sampler)
        pre.append(g.prefill_tps)
        dec.append(g.decode_tps)
        ids = g.ids
    return {"decode": med_std(dec), "prefill": med_std(pre), "ids": ids}


def time_graph_decoder(model, prompt, new, runs, compile_step: bool, fused: bool) -> dict:
    """GraphDecoder driven directly (the runtime makes the same calls), to try the compiled and fused steps."""
    t0 = time.perf_counter()
    dec = GraphDecoder(model, capacity_for(len(prompt) + new, 1 << 30), compile_step=compile_step, fused=fused)
    setup = time.perf_counter() - t0
    greedy = make_sampler(0.0)
    speeds, ids = [], None
    for i in range(runs + 1):
        first = greedy(dec.prefill(prompt))
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        ids, _ = dec.decode(first, new, greedy, greedy=True)
        torch.cuda.synchronize()
        if i:  # the first run is the warm-up
            speeds.append((len(ids) - 1) / (time.perf_counter() - t1))
    return {"decode": med_std(speeds), "ids": ids, "setup_s": setup}


def time_transformers(ckpt: Path, prompt, new, runs, static: bool) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float16).cuda().eval()
    ids = torch.tensor([prompt], device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kw["cache_implementation"] = "static"

    def gen(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t, out[0, len(prompt):].tolist()

    gen(new)  # warm-up (and, with a static cache, whatever compilation transformers does)
    gen(1)
    speeds, out = [], None
    for _ in range(runs):
        t_one, _ = gen(1)
        t_all, out = gen(new)
        speeds.append((new - 1) / (t_all - t_one))
    return {"decode": med_std(speeds), "ids": out}


def profile(model, prompt, new) -> None:
    """Kernel times of 32 replays of the fused graph (CUPTI sees the kernels inside a graph)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    dec = GraphDecoder(model, capacity_for(len(prompt) + new, 1 << 30), fused=True)
    dec.prefill(prompt)
    dec.token.fill_(1)
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(32):
            dec.graph.replay()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def agreement(a, b) -> str:
    n = min(len(a), len(b))
    same = next((i for i in range(n) if a[i] != b[i]), n)
    return f"{same}/{n}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", type=Path)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-transformers", action="store_true")
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", action="store_true", help="print the kernels of one fused graph replay")
    a = p.parse_args()
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; device-to-device copy {bw / 1e12:.2f} TB/s")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_bandwidth": bw, "models": {}}
    for ckpt in a.ckpts:
        bundle = load_checkpoint(ckpt)
        prompt = prompt_for(ckpt, bundle, a.prompt)
        wbytes = weight_bytes_per_token(bundle)
        roof = bw / wbytes
        rows = {}
        eager = TorchRuntime(bundle, device="cuda", dtype="float16", cuda_graph=False)
        rows["ours eager (static KV cache)"] = time_ours(eager, prompt, a.new, a.runs, make_sampler(0.0))
        del eager
        graph = TorchRuntime(bundle, device="cuda", dtype="float16")
        graph.fused = False  # torch kernels (cuBLAS, SDPA) in the graph
        rows["ours CUDA graph, host sampling"] = time_ours(graph, prompt, a.new, a.runs,
                                                           lambda x: int(np.argmax(x)))
        rows["ours CUDA graph, greedy on device"] = time_ours(graph, prompt, a.new, a.runs, make_sampler(0.0))
        graph._graph = None
        graph.fused = True  # what the runtime uses where Triton is installed (eval-parity's baseline)
        rows["ours CUDA graph + Triton kernels (the runtime's default), host sampling"] = time_ours(
            graph, prompt, a.new, a.runs, lambda x: int(np.argmax(x)))
        rows["ours CUDA graph + Triton kernels (the runtime's default), greedy on device"] = time_ours(
            graph, prompt, a.new, a.runs, make_sampler(0.0))
        if triton_gemv is not None and triton_gemv._pdl():
            # the same kernels launched plainly: what programmatic dependent launch gains
            triton_gemv.USE_PDL = False
            graph._graph = None
            rows["ours CUDA graph + Triton kernels without dependent launch, greedy on device"] = time_ours(
                graph, prompt, a.new, a.runs, make_sampler(0.0))
            triton_gemv.USE_PDL = True
            graph._graph = None
        variants = [] if a.no_compile else [("ours CUDA graph + torch.compile (no Triton kernels of ours)", True,
                                             False)]
        for name, comp, fused in variants:
            try:
                rows[name] = time_graph_decoder(graph.model, prompt, a.new, a.runs, comp, fused)
                print(f"{name}: set-up (graph capture{', compilation' if comp else ''}) {rows[name]['setup_s']:.1f} s")
            except Exception as e:  # report and go on: compilation depends on the machine's Triton
                print(f"{name} failed: {type(e).__name__}: {str(e)[:400]}")
        if a.profile:
            profile(graph.model, prompt, a.new)
        ref_ids = rows["ours eager (static KV cache)"]["ids"]
        del graph
        torch.cuda.empty_cache()
        if not a.no_transformers:
            for name, static in (("transformers generate, eager", False), ("transformers generate, static cache", True)):
                try:
                    rows[name] = time_transformers(ckpt, prompt, a.new, a.runs, static)
                except Exception as e:
                    print(f"{name} failed: {type(e).__name__}: {str(e)[:300]}")
        base = rows.get("transformers generate, static cache", rows.get("transformers generate, eager"))
        print(f"\n{ckpt.name}: {bundle.num_parameters() / 1e6:.1f}M parameters, {wbytes / 1e6:.1f} MB fp16 read per "
              f"token, roof {roof:,.0f} tok/s; prompt {len(prompt)}, {a.new} greedy tokens, {a.runs} runs")
        print("| decoder | decode tok/s | × transformers static | % of roof | greedy tokens = ours eager |")
        print("|---|---|---|---|---|")
        out = {}
        for name, r in rows.items():
            m, s = r["decode"]
            ratio = f"{m / base['decode'][0]:.1f}×" if base else "–"
            print(f"| {name} | {m:,.0f} ± {s:,.0f} | {ratio} | {100 * m / roof:.1f} % | {agreement(r['ids'], ref_ids)} |")
            out[name] = {"decode_tps": m, "decode_tps_std": s, "roof_pct": 100 * m / roof,
                         **({"setup_s": r["setup_s"]} if "setup_s" in r else {})}
        results["models"][ckpt.name] = {"params": bundle.num_parameters(), "weight_bytes": wbytes, "roof_tps": roof,
                                        "rows": out}
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

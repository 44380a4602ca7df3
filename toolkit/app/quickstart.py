"""`toolkit quickstart -o DIR`: the whole product on the embedded corpus, in a few minutes on 2 CPUs.

train a small model (widths multiples of 256, so llama.cpp's K-quants apply) -> GGUF f16 / q8_0 / q4_k_m with
Ollama Modelfiles -> ONNX fp32 (fused ORT graph) / int8 / int4 -> MNN 4-bit (where the MNN wheel is installed) ->
eval-parity of all of them on the held-out split.
Every export verifies itself on the way. DIR is written as `DIR.partial-<pid>` and renamed at the end.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from toolkit.core.outputs import atomic_output

# the model: 4.2M parameters; about 2 minutes of training on 2 CPUs
MODEL = dict(vocab_size=4096, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768,
             seq_len=128, batch_size=16, steps=400, warmup=30, eval_every=100, save_every=400, lr=3e-3)
GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
PARITY_CTX = 256


def run(dest: Path, force: bool = False, threads: int = 2, steps: int | None = None, repeats: int = 3,
        log: Callable[[str], None] = print, train_progress=None) -> dict:
    import importlib.util

    from exporters.gguf.exporter import export as export_gguf
    from exporters.onnx.exporter import export as export_onnx
    from exporters.onnx.quantize import quantize_onnx_folder
    from toolkit.app.parity import ParityOptions, evaluate
    from toolkit.app.parity import report as parity_report
    from toolkit.app.train import TrainOptions, train
    from toolkit.checkpoints import load_checkpoint

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def stage(name: str, t: float) -> None:
        timings[name] = time.perf_counter() - t
        log(f"[{time.perf_counter() - t0:5.0f} s] {name}: {timings[name]:.1f} s")

    with atomic_output(dest, force, directory=True) as work:
        t = time.perf_counter()
        model = work / "model"
        recipe = {**MODEL, **({"steps": steps} if steps else {})}
        summary = train(TrainOptions(out=str(model), threads=threads, **recipe), progress=train_progress)
        stage(f"trained {summary['parameters'] / 1e6:.1f}M parameters, held-out PPL "
              f"{summary['first_heldout_ppl']:.1f} -> {summary['best_heldout_ppl']:.1f}", t)
        bundle = load_checkpoint(model)
        artifacts = []
        for outtype in GGUF_TYPES:
            t = time.perf_counter()
            report = export_gguf(bundle, work / f"model-{outtype}.gguf", outtype, True, False, threads)
            artifacts.append(work / f"model-{outtype}.gguf")
            stage(f"GGUF {outtype} ({report.size_bytes / 1e6:.1f} MB, verified in llama.cpp: max |dlogit| "
                  f"{report.verification['max_abs_diff']:.2g})", t)
        t = time.perf_counter()
        onnx_fp32 = work / "onnx-fp32"
        report = export_onnx(bundle, onnx_fp32, "ort", 20, True, False, threads)
        artifacts.append(onnx_fp32)
        stage(f"ONNX fp32 (fused ORT graph, verified: max |dlogit| {report.verification['max_abs_diff']:.2g})", t)
        for kind in ("int8", "int4"):
            t = time.perf_counter()
            q = quantize_onnx_folder(onnx_fp32, work / f"onnx-{kind}", kind, threads=threads)
            artifacts.append(work / f"onnx-{kind}")
            stage(f"ONNX {kind} ({q['size_bytes'] / 1e6:.1f} MB, lm_head {q['lm_head']})", t)
        if all(importlib.util.find_spec(m) for m in ("MNN", "llmexport")):  # where the mnn extra is installed
            from exporters.mnn.engine import export as export_mnn

            t = time.perf_counter()
            report = export_mnn(bundle, work / "mnn-4bit", bits=4, group_size=64, threads=threads)
            artifacts.append(work / "mnn-4bit")
            stage(f"MNN 4-bit g64, MNN's LLM-engine folder ({report.size_bytes / 1e6:.1f} MB, verified through "
                  f"MNN.llm: KLD {report.verification['kld_mean']:.2g})", t)
        t = time.perf_counter()
        result = evaluate(ParityOptions(ckpt=model, artifacts=artifacts, ctx=PARITY_CTX, device="cpu", threads=1,
                                        repeats=repeats), log=log)
        _relocate(result, work, dest)
        (work / "parity").mkdir()
        parity_report.write(result, work / "parity")
        stage("eval-parity", t)
        result["quickstart_seconds"] = time.perf_counter() - t0
        (work / "quickstart.json").write_text(json.dumps({"timings": timings, "seconds": result["quickstart_seconds"],
                                                          "model": recipe}, indent=2) + "\n")
    return result


def _relocate(result: dict, work: Path, dest: Path) -> None:
    """Paths in the report name the final folder, not the partial one being written."""
    def fix(p: str) -> str:
        return p.replace(str(work), str(dest))

    result["checkpoint"] = fix(result["checkpoint"])
    result["baseline"]["text"] = fix(result["baseline"]["text"])
    for row in result["rows"]:
        row["path"] = fix(row["path"])

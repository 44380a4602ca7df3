"""MNN for Alibaba's mobile engine: a graph of standard ONNX ops (opset 17) with a fixed-capacity KV cache, converted
by the MNN wheel's converter to a .mnn with 16-, 8- or 4-bit weights, verified in MNN against the reference model
run on the file's own weights, then moved into place.

Folder layout: model.mnn (graph + weights), embeddings.f16.npy (the token embedding, looked up by the runtime),
config.json (Hugging Face config), tokenizer.json + tokenizer_config.json, manifest.json (toolkit/core/manifest.py;
its details carry the graph's names and RoPE tables the runtime reads).
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporters.mnn import converter, weights
from runtimes import Stepping
from toolkit.core import manifest, rope
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError
from toolkit.core.outputs import atomic_output, check_destination

BITS = (16, 8, 4)
MODEL_FILE = "model.mnn"
EMBED_FILE = "embeddings.f16.npy"
PROMPT_TOKENS = 48
DECODE_STEPS = 16  # 48 + 16 = 64 tokens, the last 16 through the cache


@dataclass
class MnnReport:
    path: str
    bits: int
    group_size: int
    hqq: bool
    size_bytes: int
    seconds: float
    verification: dict | None = None
    warnings: list[str] = field(default_factory=list)


# why an MNN export cannot hold dynamic NTK scaling (toolkit/core/rope.py refuses it with this)
DYNAMIC_REFUSAL = "the exported folder's RoPE frequencies are fixed in manifest.json, which the runtime reads once"


def rope_tables(bundle: ModelBundle) -> tuple[np.ndarray, float]:
    """The inverse frequencies and attention scaling the runtime computes cos/sin from (toolkit/core/rope.py)."""
    return rope.fixed_frequencies(bundle.config, "MNN export", DYNAMIC_REFUSAL)


def check_options(bundle: ModelBundle | None, bits: int, group_size: int, hqq: bool) -> None:
    """Refuse what the converter would do wrongly or not at all, before any work."""
    if bundle is not None:
        rope_tables(bundle)
    if bits not in BITS:
        raise ToolkitError(f"--bits {bits} is not offered", "choose --bits 16 (fp16 weights), 8 or 4")
    if bits == 16:
        if hqq:
            raise ToolkitError("--hqq refines quantized weights; 16-bit weights are not quantized",
                               "use --hqq with --bits 8 or 4")
        return
    if group_size < 0:
        raise ToolkitError(f"group size {group_size} is negative", "choose e.g. --group-size 64, or 0 for one "
                                                                    "scale per output channel")
    if bundle is None or not group_size:
        return
    for name in weights.matmul_weights(bundle):
        width = bundle.tensors[name].shape[-1]
        if width % group_size:
            raise ToolkitError(f"group size {group_size} does not divide the input width {width} of {name}",
                               "choose a --group-size that divides every width (e.g. 32), or 0 for one scale per "
                               "output channel")


def _embedding(bundle: ModelBundle) -> np.ndarray:
    return bundle.load(weights.EMBEDDING, torch.float32).numpy().astype(np.float16)


# router-logit gap below which MNN, computing on rounded weights, may pick the other expert of a near-tie: there the
# reference follows MNN's choice (toolkit/core/routing_ties.py; the same gaps as llama.cpp's types of these widths)
ROUTER_GAP = {16: 0.02, 8: 0.05, 4: 0.2}


def verify(bundle: ModelBundle, folder: Path, bits: int, group_size: int, hqq: bool, threads: int = 1) -> dict:
    """Prefill of PROMPT_TOKENS of the shared verification text, then DECODE_STEPS single tokens through the cache,
    against the reference model on the source weights (MoE near-ties routed as MNN routed them), judged by the
    shared verifier's bar for the bit width."""
    from exporters.onnx.exporter import check_tokenizer
    from runtimes import RUNTIMES

    check_tokenizer(bundle, folder, "MNN")
    runtime: Stepping = RUNTIMES["mnn"].load(folder, threads=threads)
    return judge_prefill_and_steps(bundle, runtime, bits, "MNN's logits")


def judge_prefill_and_steps(bundle: ModelBundle, runtime: Stepping, bits: int, what: str) -> dict:
    """A prefill of PROMPT_TOKENS of the verification text, then DECODE_STEPS single tokens through the runtime's
    cache, against the reference model on the source weights (MoE near-ties routed as MNN routed them), judged by
    the shared verifier's `mnn:<bits>` bar. Shared by both MNN layouts."""
    from toolkit.core.routing_ties import reference_logits
    from toolkit.core.streamed_model import reference_model
    from toolkit.core.verify import judge, verification_ids

    ids = verification_ids(bundle.tokenizer, bundle.config.vocab_size, PROMPT_TOKENS + DECODE_STEPS)
    runtime.reset()
    prefill = runtime.step(ids[:PROMPT_TOKENS])
    got = np.concatenate([prefill] + [runtime.step([t]) for t in ids[PROMPT_TOKENS:]])
    ref, swapped = reference_logits(reference_model(bundle), ids, got, ROUTER_GAP[bits])
    prefill_diff = float(np.abs(prefill - ref[:PROMPT_TOKENS]).max()) if np.isfinite(prefill).all() else math.inf
    result = judge(ref, got, f"mnn:{bits}", what)
    return {**result, "prefill_tokens": PROMPT_TOKENS, "decode_steps": DECODE_STEPS,
            "max_abs_diff_prefill": prefill_diff, "argmax_agreement": result["top1"], "tokenizer_match": True,
            "near_tie_routes_followed": swapped, "against": "reference model on the source weights"}


def write_manifest(folder: Path, bundle: ModelBundle, report: MnnReport, memory_mode: str,
                   source_hash=None) -> None:
    cfg = bundle.config
    inv_freq, attention_scaling = rope_tables(bundle)
    details = {
        "memory_mode": memory_mode, "embedding_file": EMBED_FILE,
        "graph": {"opset": 17, "variant": "static", "inputs": ["inputs_embeds", "rope_cos", "rope_sin", "position_ids"],
                  "cache_inputs": "past_key_values.%d.key / .value [1, kv_heads, capacity, head_dim]",
                  "outputs": ["logits"], "cache_outputs": "present.%d.key / .value",
                  "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                  "hidden_size": cfg.hidden_size, "max_positions": cfg.max_position_embeddings,
                  # the runtime's RoPE: angles = position * inv_freq in fp32, as the reference computes them, cos and
                  # sin multiplied by the attention scaling (yarn), sin negated for rope_sign -1
                  "rope_inv_freq": [float(x) for x in inv_freq], "rope_attention_scaling": attention_scaling,
                  "rope_sign": cfg.fam.rope_sign},
    }
    if bundle.provenance.get("quantization"):
        details["from_quantized_checkpoint"] = ("the checkpoint's dequantized weights, re-quantized by MNN's "
                                                "converter" if report.bits < 16 else "its dequantized weights, fp16")
    quantization = None if report.bits == 16 else {
        "method": "MNN's converter: " + " ".join(converter.converter_flags(report.bits, report.group_size, report.hqq)),
        "bits": report.bits,
        "group_size": report.group_size, "hqq": report.hqq}
    manifest.write(folder / manifest.FOLDER_FILE, manifest.build(
        format="mnn", runtime="mnn", artifact=Path(report.path).name, bundle=bundle,
        dtype={16: "float16", 8: "int8", 4: "int4"}[report.bits], size_bytes=report.size_bytes,
        versions=manifest.package_versions("MNN", "onnx", "torch", "edge-toolkit"),
        verification=report.verification or None, source_hash=source_hash, quantization=quantization,
        warnings=report.warnings, details=details))


def export(bundle: ModelBundle, out: Path, bits: int = 4, group_size: int = 64, hqq: bool = False,
           verify_model: bool = True, force: bool = False, threads: int = 1) -> MnnReport:
    import onnx

    from exporters.onnx.exporter import save_model, write_side_files
    from exporters.onnx.graph import build

    out = Path(out)
    check_options(bundle, bits, group_size, hqq)
    check_destination(out, force)
    source_hash = manifest.SourceHash(bundle.provenance)
    t0 = time.perf_counter()
    with atomic_output(out, force, directory=True) as work:
        with tempfile.TemporaryDirectory(prefix="onnx-", dir=work.parent) as tmp:
            model = build(weights.graph_bundle(bundle, bits), 17, "static")
            onnx.checker.check_model(model)
            save_model(model, Path(tmp))
            del model
            converter.convert(Path(tmp) / "model.onnx", work / MODEL_FILE,
                              converter.converter_flags(bits, group_size, hqq))
        np.save(work / EMBED_FILE, _embedding(bundle))
        write_side_files(bundle, work, "portable")
        size = sum(p.stat().st_size for p in (work / MODEL_FILE, work / EMBED_FILE))
        report = MnnReport(str(out), bits, group_size, hqq, size, 0.0)
        memory_mode = "normal" if bits == 16 else "low"
        write_manifest(work, bundle, report, memory_mode, source_hash)  # the runtime reads it during verification
        if verify_model:
            report.verification = verify(bundle, work, bits, group_size, hqq, threads)
        report.seconds = time.perf_counter() - t0
        write_manifest(work, bundle, report, memory_mode, source_hash)
    return report


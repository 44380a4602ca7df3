"""MNN for Alibaba's mobile engine: a graph of standard ONNX ops (opset 17) with a fixed-capacity KV cache, converted
by the MNN wheel's converter to a .mnn with 16-, 8- or 4-bit weights, verified in MNN against the reference model
run on the file's own weights, then moved into place.

Folder layout: model.mnn (graph + weights), embeddings.f16.npy (the token embedding, looked up by the runtime),
config.json (Hugging Face config), tokenizer.json + tokenizer_config.json, export.json (bits, group size, names,
verification, versions).
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporters import ExporterSpec, package_versions, register
from exporters.mnn import converter, weights
from exporters.onnx.graph import _rope_inv_freq
from toolkit.bundle import ModelBundle
from toolkit.errors import ToolkitError, VerificationError
from toolkit.outputs import atomic_output, check_destination

BITS = (16, 8, 4)
MODEL_FILE = "model.mnn"
EMBED_FILE = "embeddings.f16.npy"
# max |logit difference| against the reference model on the file's own weights, the larger of an absolute bound and
# a share of the largest |logit|. 16 bits: MNN computes in fp32, but `--fp16` also truncates the graph's other float
# constants (e.g. the 1/cap of a logit softcap: 1e-3 at NanoChat's logits). 8/4 bits: MNN's low-memory kernels
# quantize activations to int8 on the fly (as llama.cpp's q8 dot products do), an error that grows with the scale.
TOLERANCE = {16: 1e-3, 8: 0.1, 4: 0.25}
RELATIVE = {16: 1e-3, 8: 2e-2, 4: 5e-2}
VERIFY_TEXT = "The quick brown fox jumps over the lazy dog. def main():\n    return 42\n你好，世界！ 🙂"
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


def check_options(bundle: ModelBundle | None, bits: int, group_size: int, hqq: bool) -> None:
    """Refuse what the converter would do wrongly or not at all, before any work."""
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


def verify(bundle: ModelBundle, folder: Path, bits: int, group_size: int, hqq: bool, threads: int = 1) -> dict:
    """Prefill of PROMPT_TOKENS, then DECODE_STEPS single tokens through the cache, against the reference model on
    the file's weights: computed here for MNN's fp16 and min/max grids, read back out of MNN for HQQ's refined
    one (which is not reproducible outside it)."""
    from exporters.onnx import TorchReference
    from runtimes import RUNTIMES

    if hqq:
        with tempfile.TemporaryDirectory(prefix="probe-", dir=folder.parent) as tmp:
            stored = weights.read_back_bundle(bundle, converter.converter_flags(bits, group_size, hqq), tmp)
    else:
        stored = weights.file_bundle(bundle, bits, group_size)
    reference = TorchReference(stored, PROMPT_TOKENS + DECODE_STEPS)
    runtime = RUNTIMES["mnn"].load(folder, threads=threads)
    ids = [i % bundle.config.vocab_size
           for i in (bundle.tokenizer.encode(VERIFY_TEXT, add_bos=False) * 8)[:PROMPT_TOKENS + DECODE_STEPS]]
    state, diffs, agree, largest, finite = None, [], 0, 0.0, True
    runtime.reset()
    feeds = [ids[:PROMPT_TOKENS]] + [[t] for t in ids[PROMPT_TOKENS:]]
    seen = 0
    for feed in feeds:
        seen += len(feed)
        ref, state = reference.forward(np.array([feed], np.int64), np.ones((1, seen), np.int64), state)
        ref = ref[0]
        got = runtime.step(feed)
        finite &= bool(np.isfinite(got).all())
        diffs.append(float(np.abs(got - ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        largest = max(largest, float(np.abs(ref).max()))
    allowed = max(TOLERANCE[bits], RELATIVE[bits] * largest)
    result = {"tokens": seen, "prefill_tokens": PROMPT_TOKENS, "decode_steps": DECODE_STEPS,
              "max_abs_diff_prefill": diffs[0], "max_abs_diff_decode": max(diffs[1:]), "max_abs_diff": max(diffs),
              "argmax_agreement": agree / seen, "max_abs_logit": largest, "finite": finite, "tolerance": allowed,
              "against": "reference model on the file's weights" + (" (read back from MNN)" if hqq else "")}
    if not finite or not max(diffs) <= allowed:
        raise VerificationError(f"MNN logits differ from the reference model by {max(diffs):.3g} (allowed "
                                f"{allowed:.3g} for {bits}-bit weights)", "the export is not kept; report this "
                                                                          "with --debug output")
    return result


def write_manifest(folder: Path, bundle: ModelBundle, report: MnnReport, memory_mode: str) -> None:
    cfg = bundle.config
    manifest = {
        "format": "mnn", "bits": report.bits, "group_size": report.group_size if report.bits < 16 else None,
        "hqq": report.hqq, "dtype": {16: "float16", 8: "int8", 4: "int4"}[report.bits],
        "memory_mode": memory_mode, "family": cfg.family, "size_bytes": report.size_bytes,
        "graph": {"opset": 17, "variant": "static", "inputs": ["inputs_embeds", "rope_cos", "rope_sin", "position_ids"],
                  "cache_inputs": "past_key_values.%d.key / .value [1, kv_heads, capacity, head_dim]",
                  "outputs": ["logits"], "cache_outputs": "present.%d.key / .value",
                  "num_layers": cfg.num_layers, "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
                  "hidden_size": cfg.hidden_size, "max_positions": cfg.max_position_embeddings,
                  # the runtime's RoPE: angles = position * inv_freq in fp32, as the reference computes them
                  "rope_inv_freq": [float(x) for x in _rope_inv_freq(cfg)], "rope_sign": cfg.fam.rope_sign},
        "embedding_file": EMBED_FILE, "source": bundle.provenance,
        "versions": package_versions("MNN", "onnx", "torch", "edge-toolkit"),
        "verification": report.verification, "warnings": report.warnings,
    }
    if bundle.provenance.get("quantization"):
        manifest["from_quantized_checkpoint"] = ("the checkpoint's dequantized weights, re-quantized by MNN's "
                                                 "converter" if report.bits < 16 else "its dequantized weights, fp16")
    (folder / "export.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def export(bundle: ModelBundle, out: Path, bits: int = 4, group_size: int = 64, hqq: bool = False,
           verify_model: bool = True, force: bool = False, threads: int = 1) -> MnnReport:
    import onnx

    from exporters.onnx import save_model, write_side_files
    from exporters.onnx.graph import build

    out = Path(out)
    check_options(bundle, bits, group_size, hqq)
    check_destination(out, force)
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
        write_manifest(work, bundle, report, memory_mode)  # the runtime reads it during verification
        if verify_model:
            report.verification = verify(bundle, work, bits, group_size, hqq, threads)
        report.seconds = time.perf_counter() - t0
        write_manifest(work, bundle, report, memory_mode)
    return report


register(ExporterSpec("mnn", "MNN for Alibaba's mobile engine (16/8/4-bit weights)", export))

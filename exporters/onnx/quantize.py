"""Quantization of an exported ONNX folder with ONNX Runtime's own quantizers, then verification against the
fp32 graph it came from (itself verified against the reference model when it was exported).

- int8: `quantize_dynamic` (int8 weights, one scale per output channel; activations quantized on the fly:
  DynamicQuantizeLinear + MatMulInteger). The lm_head is its own constant in our graphs, so it is quantized too.
- int4: `MatMulNBitsQuantizer` (blockwise symmetric round-to-nearest, `accuracy_level=4`: int8 activations in the
  dot products, the fast CPU path); the lm_head is re-quantized in a second pass at `lm_head_bits` (8 by default:
  the head is the matmul whose error shows most in the next-token distribution).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from toolkit.core import manifest
from toolkit.core.errors import ToolkitError, VerificationError
from toolkit.core.outputs import atomic_output
from toolkit.core.targets import Outcome, RunContext

LM_HEAD = "/lm_head/MatMul"
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "genai_config.json")


def _quiet_ort_logging() -> None:
    for name in ("onnxruntime", "onnxruntime.quantization", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _int8(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, use_external_data_format=True,
                     # contrib ops (GroupQueryAttention...) defeat ONNX shape inference: their outputs are fp32
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})


def _int4(src: Path, dst: Path, group_size: int, lm_head_bits: int) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    body = MatMulNBitsQuantizer(model, bits=4, block_size=group_size, is_symmetric=True, accuracy_level=4,
                                nodes_to_exclude=[LM_HEAD])
    body.process()
    # only the head is still a MatMul with a constant weight now
    head = MatMulNBitsQuantizer(body.model.model, bits=lm_head_bits, block_size=group_size, is_symmetric=True,
                                accuracy_level=4)
    head.process()
    for node in head.model.model.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = 4
    head.model.save_model_to_file(str(dst), use_external_data_format=True)


def _summary(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = [n for n in model.graph.node]
    quantized = [n for n in ops if n.op_type in ("MatMulNBits", "MatMulInteger")]
    head = [n for n in ops if n.name.startswith(LM_HEAD) and n.op_type in ("MatMul", "MatMulNBits", "MatMulInteger")]
    head_desc = "fp32"
    if head and head[0].op_type == "MatMulNBits":
        bits = next((a.i for a in head[0].attribute if a.name == "bits"), 4)
        head_desc = f"{bits}-bit MatMulNBits"
    elif head and head[0].op_type == "MatMulInteger":
        head_desc = "int8 MatMulInteger"
    return {"matmuls": sum(n.op_type in ("MatMul", "MatMulNBits", "MatMulInteger") for n in ops),
            "quantized_matmuls": len(quantized), "lm_head": head_desc}


def quantize_onnx_folder(src: Path, dest: Path, kind: str, force: bool = False, threads: int = 1,
                         group_size: int = 32, lm_head_bits: int = 8) -> dict:
    from exporters.onnx.exporter import MODEL_FILE, folder_size, paired_logits
    from runtimes import RUNTIMES
    from toolkit.core.tokenizer import Tokenizer
    from toolkit.core.verify import judge

    src = Path(src)
    meta = manifest.read(src) or {}  # a folder of another tool's has none: then nothing is known of its source
    if meta.get("dtype", "float32") != "float32":
        raise ToolkitError(f"{src} is already quantized ({meta.get('dtype')})", "quantize the fp32 export folder")
    _quiet_ort_logging()
    with atomic_output(dest, force, directory=True) as work:
        try:
            if kind == "int8":
                _int8(src / MODEL_FILE, work / MODEL_FILE)
            else:
                _int4(src / MODEL_FILE, work / MODEL_FILE, group_size, lm_head_bits)
        except Exception as e:  # ORT's quantizers raise plain exceptions on graphs they cannot handle
            raise ToolkitError(f"ONNX Runtime's {kind} quantizer failed on {src}: {str(e)[:300]}",
                               "quantize a folder written by `toolkit export onnx`") from None
        for name in SIDE_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, work / name)
        summary = _summary(work / MODEL_FILE)
        tokenizer = Tokenizer.from_dir(src)
        vocab = json.loads((src / "config.json").read_text())["vocab_size"]
        # against the fp32 graph, itself verified against the reference model at fp32 precision
        ref, got, info = paired_logits(RUNTIMES["onnxruntime"].load(src, threads=threads),
                                        RUNTIMES["onnxruntime"].load(work, threads=threads), tokenizer, vocab)
        try:
            verification = {**info, **judge(ref, got, f"onnx:{kind}", f"the {kind} graph's logits")}
        except VerificationError as e:
            raise VerificationError(e.message, "the output is not kept; try a smaller --group-size or "
                                                    "--lm-head-bits 8") from None
        verification["argmax_agreement"] = verification["top1"]
        size, source_size = folder_size(work), folder_size(src)
        settings = {"group_size": group_size, "lm_head_bits": lm_head_bits, "symmetric": True,
                    "accuracy_level": 4} if kind == "int4" else {"per_channel": True, "weight_type": "int8",
                                                                  "activations": "dynamic uint8"}
        quantization = {"method": "onnxruntime " + ("MatMulNBits RTN" if kind == "int4" else "dynamic"),
                        **settings, **summary}
        details = {**meta.get("details", {}), "source_size_bytes": source_size,
                   "verified_against": "the fp32 ONNX graph"}
        source = {"format": "onnx", "path": str(src), "sha256": None, "exported_from": meta.get("source")}
        report = {**{k: meta.get(k) for k in manifest.KEYS}, "schema": manifest.SCHEMA, "format": "onnx",
                  "runtime": "onnxruntime", "artifact": Path(dest).name, "dtype": kind,
                  "quantization": quantization, "size_bytes": size, "source": source,
                  "versions": manifest.package_versions("onnx", "onnxruntime", "torch", "edge-toolkit"),
                  "verification": verification, "warnings": meta.get("warnings") or [], "details": details}
        manifest.write(work / manifest.FOLDER_FILE, report)
    return {**report, **summary, "source_size_bytes": source_size}


def _source_folder(src: Path, opts, work: Path, ctx: RunContext) -> Path:
    """The folder with model.onnx: an export folder as it is, or a checkpoint exported first into `work`."""
    from exporters.onnx import is_export_folder

    if Path(src).is_dir() and is_export_folder(src):
        return Path(src)
    from exporters.onnx.exporter import check_opset, check_variant, export

    check_opset(opts.opset)
    bundle = ctx.load(src)
    check_variant(bundle, opts.variant)
    ctx.log(f"exporting {src} to ONNX ({opts.variant}, opset {opts.opset}) first")
    export(bundle, work / "fp32", opts.variant, opts.opset, True, False, ctx.threads)
    return work / "fp32"


def run_int8(src: Path, dest: Path, opts, ctx: RunContext) -> Outcome:
    """`quantize int8 --format onnx` (exporters/onnx/__init__.py)."""
    return _run("int8", src, dest, opts, ctx, {})


def run_int4(src: Path, dest: Path, opts, ctx: RunContext) -> Outcome:
    """`quantize int4 --format onnx` (exporters/onnx/__init__.py)."""
    if opts.group_size not in (16, 32, 64, 128, 256):
        raise ToolkitError(f"--group-size {opts.group_size} is not supported by MatMulNBits",
                           "choose 16, 32, 64, 128 or 256")
    if opts.lm_head_bits not in (4, 8):
        raise ToolkitError(f"--lm-head-bits {opts.lm_head_bits} is not supported", "choose 4 or 8")
    return _run("int4", src, dest, opts, ctx, {"group_size": opts.group_size, "lm_head_bits": opts.lm_head_bits})


def _run(kind: str, src: Path, dest: Path, opts, ctx: RunContext, options: dict) -> Outcome:
    import tempfile
    import time

    from toolkit.core.verify import verified_line

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="toolkit-quant-", dir=dest.parent if dest.parent.exists() else None) as tmp:
        folder = _source_folder(src, opts, Path(tmp), ctx)
        report = quantize_onnx_folder(folder, dest, kind, force=ctx.force, threads=ctx.threads, **options)
    return Outcome(dest, f"{kind} ONNX: {report['size_bytes'] / 1e6:.1f} MB (fp32 "
                         f"{report['source_size_bytes'] / 1e6:.1f} MB), {report['quantized_matmuls']} of "
                         f"{report['matmuls']} MatMuls quantized, lm_head {report['lm_head']}; "
                         f"{time.perf_counter() - t0:.1f} s; verified against the fp32 graph "
                         f"({verified_line(report['verification'])})", report=report)

"""GGUF for llama.cpp: write, verify in llama.cpp against the reference model, then move into place."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from exporters import ExporterSpec, register
from exporters.gguf.tensors import OUTTYPES, _tensor_type
from exporters.gguf.modelfile import write_modelfile
from exporters.gguf.writer import GGUFReport, write_gguf, write_manifest
from toolkit.bundle import ModelBundle
from toolkit.errors import ToolkitError, VerificationError
from toolkit.outputs import atomic_output, check_destination

# max |logit difference| allowed against the reference model on the file's own (dequantized) weights
# bf16: llama.cpp rounds activations to bf16 inside its bf16 dot products, so it drifts more than f16
TOLERANCE = {"f32": 1e-4, "f16": 5e-3, "bf16": 5e-2, "q8_0": 0.1, "q4_0": 0.25}
# rounded types also round activations inside llama.cpp's matmuls, an error that grows with the logits' scale:
# the bound is the larger of the absolute one and this share of the reference's largest |logit| (f32 stays exact)
RELATIVE = {"f32": 0.0, "f16": 5e-3, "bf16": 2e-2, "q8_0": 2e-2, "q4_0": 5e-2}
VERIFY_TEXT = ("The quick brown fox jumps over the lazy dog. def main():\n    return 42\n"
               "你好，世界！今天是2024年3月15日。 Ünïcödé ✓ 🙂🚀 ")
VERIFY_TOKENS = 64


def dequantized_bundle(bundle: ModelBundle, outtype: str) -> ModelBundle:
    """The bundle with every weight rounded as the file stores it: the reference a quantized file must match.
    Quantization blocks run along rows, so rounding before or after llama's row permutation is the same."""
    import gguf

    from toolkit.bundle import TensorRef

    if outtype == "f32":
        return bundle
    refs = {}
    for name, ref in bundle.tensors.items():
        refs[name] = ref
        if ref.numel == 0 or len(ref.shape) < 2:
            continue
        # the router stays F32 as in the file; other matrices get the file's type (or its F16 fallback)
        qtype = _tensor_type(".ffn_gate_inp." if name.endswith("mlp.gate.weight") else name, ref.shape, outtype)[0]
        if qtype in (gguf.GGMLQuantizationType.F32, None):
            continue

        def rounded(t, qtype=qtype):
            x = t.float().numpy()
            return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype).astype(np.float32)
                                    .reshape(x.shape))

        refs[name] = ref.derive(rounded)
    return ModelBundle(bundle.config, refs, bundle.tokenizer, dict(bundle.provenance))


def verify(bundle: ModelBundle, path: Path, outtype: str, threads: int = 1, verbose: bool = False) -> dict:
    from runtimes import RUNTIMES
    from toolkit.model import build_model

    runtime = RUNTIMES["llama_cpp"].load(path, threads=threads, ctx=256, verbose=verbose)
    tok = bundle.tokenizer
    hf_ids = tok.encode(VERIFY_TEXT, add_bos=False)
    cpp_ids = runtime.tokenize(VERIFY_TEXT)
    if hf_ids != cpp_ids:
        first = next(i for i, (a, b) in enumerate(zip(hf_ids + [-1], cpp_ids + [-2])) if a != b)
        raise VerificationError(f"llama.cpp tokenizes differently from the Hugging Face tokenizer (first "
                                f"difference at token {first})", "the tokenizer cannot be represented in GGUF")
    ids = (hf_ids * (VERIFY_TOKENS // len(hf_ids) + 1))[:VERIFY_TOKENS]
    reference = build_model(dequantized_bundle(bundle, outtype))
    with torch.no_grad():
        ref = reference(torch.tensor([ids]))[0].numpy()
    got = runtime.logits(ids)
    diff = float(np.abs(got - ref).max())
    agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
    allowed = max(TOLERANCE[outtype], RELATIVE[outtype] * float(np.abs(ref).max()))
    result = {"tokens": len(ids), "max_abs_diff": diff, "argmax_agreement": agree, "tolerance": allowed,
              "tokenizer_match": True}
    if not diff <= allowed:
        raise VerificationError(f"llama.cpp logits differ from the reference model by {diff:.3g} (allowed "
                                f"{allowed:.3g} for {outtype})", "the file is not kept; report this with "
                                                                            "--debug output")
    return result


def export(bundle: ModelBundle, out: Path, outtype: str = "f16", verify_file: bool = True, force: bool = False,
           threads: int = 1, verbose: bool = False,
           progress: Callable[[str, int, int], None] | None = None) -> GGUFReport:
    if outtype not in OUTTYPES:
        raise ToolkitError(f"unknown GGUF type '{outtype}'", f"choose one of: {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.suffix != ".gguf":
        raise ToolkitError(f"{out} does not end in .gguf", "name the output FILE.gguf")
    manifest = out.with_name(out.stem + ".manifest.json")
    modelfile = out.with_name(out.stem + ".Modelfile")
    for dest in (out, manifest, modelfile):
        check_destination(dest, force)
    with atomic_output(out, force) as partial, atomic_output(manifest, force) as partial_manifest, \
            atomic_output(modelfile, force) as partial_modelfile:
        report = write_gguf(bundle, partial, outtype, progress)
        if verify_file:
            report.verification = verify(bundle, partial, outtype, threads, verbose)
        report.path = str(out)
        warning = write_modelfile(out, bundle.tokenizer, bundle.config.max_position_embeddings, partial_modelfile)
        if warning:
            report.warnings.append(warning)
        write_manifest(report, bundle, partial_manifest)
    return report


register(ExporterSpec("gguf", "GGUF for llama.cpp and Ollama", export))

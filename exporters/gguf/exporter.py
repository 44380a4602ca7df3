"""`toolkit export gguf`: write, verify in llama.cpp against the reference model, then move into place.

torch is imported by the verification only: with --no-verify a safetensors checkpoint is converted without it."""
from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path
from typing import Callable

from exporters.gguf.modelfile import write_modelfile
from exporters.gguf.tensors import OUTTYPES, gptq_q4_0_exact
from exporters.gguf.writer import GGUFReport, write_gguf, write_manifest
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError, VerificationError
from toolkit.core.fd_redirect import redirected
from toolkit.core.manifest import SourceHash, manifest_path
from toolkit.core.outputs import atomic_output, check_destination
from toolkit.core.targets import Outcome, RunContext

# router-logit gap below which llama.cpp, computing at the type's precision, may pick the other expert of a near-tie
# (toolkit/core/routing_ties.py): q8_0 files were seen to flip gaps up to ~0.02
ROUTER_GAP = {"f32": 1e-4, "f16": 0.02, "bf16": 0.05, "q8_0": 0.05, "q4_0": 0.2, "q6_k": 0.05, "q5_k_m": 0.1,
              "q4_k_m": 0.2}
# Types made by llama.cpp's own quantizer (llama_model_quantize) from an f32 file we write first: the K-quants, and
# q4_0, whose file type keeps the output matrix (the embedding, when tied) at Q6_K/Q8_0 as llama.cpp's does
LLAMA_QUANTIZED = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                   "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}
KQUANTS = {k: v for k, v in LLAMA_QUANTIZED.items() if k != "q4_0"}
ALL_TYPES = [*OUTTYPES, *KQUANTS]
# calibration samples x tokens for --calib (the activation energies settle well before)
IMPORTANCE_SAMPLES, IMPORTANCE_SEQLEN = 64, 512
# the tokenizer check: a text of every kind llama.cpp's pre-tokenizers treat differently
TOKENIZER_TEXT = ("The quick brown fox jumps over the lazy dog. def main():\n    return 42\n"
                  "你好，世界！今天是2024年3月15日。 Ünïcödé ✓ 🙂🚀 I'M don't   \t\n\n 3.14159")


def verify(bundle: ModelBundle, path: Path, outtype: str, threads: int = 1, verbose: bool = False) -> dict:
    """llama.cpp's tokenization of a fixed text must equal the tokenizer's, and its logits on the verification text
    must meet the type's bar against the reference model on the source weights (toolkit/core/verify.py).

    The reference is streamed (one matrix at a time) and, for a dense model, runs while llama.cpp reads
    the file in a second thread: the verification then costs about one forward pass of each, not the reading too."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from runtimes import RUNTIMES, Runtime
    from toolkit.core.routing_ties import reference_logits
    from toolkit.core.streamed_model import reference_model
    from toolkit.core.verify import VERIFY_TOKENS, first_difference, judge, verification_ids

    tok = bundle.tokenizer
    ids = verification_ids(tok, bundle.config.vocab_size)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with ThreadPoolExecutor(1) as pool:
            opening = pool.submit(RUNTIMES["llama_cpp"].load, path, threads=threads, ctx=max(256, VERIFY_TOKENS),
                                  verbose=verbose)
            # an MoE reference follows llama.cpp's near-tie routes, so it waits for llama.cpp's logits
            ref = None if bundle.config.fam.moe else reference_logits(reference_model(bundle), ids, None, 0.0)[0]
            runtime: Runtime = opening.result()
            del opening  # the future would keep llama.cpp (and its mapping of the file) alive past `del runtime`
    finally:
        torch.set_num_threads(torch_threads)  # the caller's setting (tests and the harness call this in-process)
    hf_ids = tok.encode(TOKENIZER_TEXT, add_bos=False)
    cpp_ids = runtime.prompt_ids(TOKENIZER_TEXT)  # llama.cpp's tokenization of a prompt: no BOS, no specials
    if hf_ids != cpp_ids:
        first = first_difference(hf_ids, cpp_ids)
        raise VerificationError(f"llama.cpp tokenizes differently from the Hugging Face tokenizer (first "
                                f"difference at token {first}: {hf_ids[first:first + 1]} vs "
                                f"{cpp_ids[first:first + 1]})", "the tokenizer cannot be represented in GGUF")
    got = runtime.logits(ids)
    del runtime  # llama.cpp unmaps the file before an MoE reference's weights come: the peak is one of them
    swapped = 0
    if ref is None:  # MoE near-ties are routed as llama.cpp routed them; everything else is the model as it is
        ref, swapped = reference_logits(reference_model(bundle), ids, got, ROUTER_GAP[outtype])
    result = judge(ref, got, f"gguf:{outtype}", f"llama.cpp's logits for {path.name.split('.partial-')[0]}")
    return {**result, "tokenizer_match": True, "tokenizer_text_tokens": len(hf_ids),
            "near_tie_routes_followed": swapped}


def export(bundle: ModelBundle, out: Path, outtype: str = "f16", verify_file: bool = True, force: bool = False,
           threads: int = 1, verbose: bool = False,
           progress: Callable[[str, int, int], None] | None = None, calib: Path | None = None) -> GGUFReport:
    if outtype not in ALL_TYPES:
        raise ToolkitError(f"unknown GGUF type '{outtype}'", f"choose one of: {', '.join(ALL_TYPES)}")
    out = Path(out)
    calibration = _calibration(bundle, outtype, calib)  # bad calibration text fails before any work
    if out.suffix != ".gguf":
        raise ToolkitError(f"{out} does not end in .gguf", "name the output FILE.gguf")
    manifest = manifest_path(out)
    modelfile = out.with_name(out.stem + ".Modelfile")
    for dest in (out, manifest, modelfile):
        check_destination(dest, force)
    source_hash = SourceHash(bundle.provenance)
    with atomic_output(out, force) as partial, atomic_output(manifest, force) as partial_manifest, \
            atomic_output(modelfile, force) as partial_modelfile:
        if outtype in LLAMA_QUANTIZED and not (outtype == "q4_0" and gptq_q4_0_exact(bundle)):
            report = llama_quantize(bundle, partial, outtype, threads, progress)
            _place_codes(bundle, partial, outtype, calibration, report)
        else:
            report = write_gguf(bundle, partial, outtype, progress)
        if verify_file:
            report.verification = verify(bundle, partial, outtype, threads, verbose)
        report.path = str(out)
        warning = write_modelfile(out, bundle.tokenizer, bundle.config.max_position_embeddings, partial_modelfile,
                                  gguf_file=partial)
        if warning:
            report.warnings.append(warning)
        write_manifest(report, bundle, partial_manifest, source_hash)
    return report


def _calibration(bundle: ModelBundle, outtype: str, calib: Path | None):
    """Calibration ids for importance-weighted rounding (--calib), checked up front; None without --calib."""
    if calib is None:
        return None
    if outtype not in LLAMA_QUANTIZED:
        raise ToolkitError(f"--calib applies to q4_0 and the K-quants, not {outtype}",
                           "drop --calib, or choose --outtype q4_0|q4_k_m|q5_k_m|q6_k")
    if bundle.provenance.get("quantization"):
        raise ToolkitError("--calib rounds full-precision weights; this checkpoint is already quantized",
                           "export the original checkpoint with --calib, or this one without it")
    from toolkit.core.calibration import calibration_ids

    return calibration_ids(bundle, Path(calib), IMPORTANCE_SAMPLES, IMPORTANCE_SEQLEN)


def _place_codes(bundle: ModelBundle, partial: Path, outtype: str, calibration, report: GGUFReport) -> None:
    """Into llama.cpp's file (its tensor mix, its rounding): a `--target gguf:TYPE` checkpoint's own codes, or
    importance-weighted rounding from --calib. Anything re-rounded by llama.cpp instead is said (warning, manifest)."""
    from exporters.gguf import blocks
    from toolkit.core.quantized import GGUF_METHOD

    q = bundle.provenance.get("quantization") or {}
    if q.get("quant_method") == GGUF_METHOD:
        if q.get("ggml_ftype") != outtype:
            report.warnings.append(f"re-quantized: the checkpoint holds codes for {q.get('ggml_ftype')}; llama.cpp "
                                   f"rounded its dequantized weights to {outtype} (export with --outtype "
                                   f"{q.get('ggml_ftype')} to keep them)")
            report.rounding = {"method": f"llama.cpp's quantizer on the dequantized {q.get('ggml_ftype')} weights "
                                         "(re-quantized)", "requantized": True}
            return
        in_file = blocks.read_blocks(partial)
        placed, other = {}, []
        for hf, gname in blocks.gguf_names(bundle).items():
            stored_type = (q.get("tensor_types") or {}).get(hf)
            if hf not in bundle.quantized_parts or gname not in in_file:
                continue
            if in_file[gname][0] != stored_type:
                other.append(f"{gname} ({stored_type} in the checkpoint, {in_file[gname][0]} here)")
                continue
            stored = bundle.quantized_parts[hf]()["ggml_blocks"].numpy()
            placed[gname] = (stored_type, blocks.to_file_rows(hf, stored, bundle.config))
        blocks.patch(partial, placed)
        if other:
            report.warnings.append(f"re-quantized by llama.cpp: {len(other)} tensors whose type differs from the "
                                   f"checkpoint's: {', '.join(other[:4])}")
        report.rounding = {"method": f"the checkpoint's {q.get('toolkit_method', '')} codes on llama.cpp's "
                                     f"{outtype} grids, written unchanged", "tensors_kept": len(placed),
                           "requantized": len(other)}
        return
    if q.get("quant_method"):
        report.warnings.append(f"re-quantized: llama.cpp rounded the {q.get('quant_method')} checkpoint's "
                               f"dequantized weights to {outtype} (only `quantize int4 --target gguf:{outtype}` "
                               "codes, and symmetric group-32 GPTQ for q4_0, go in unchanged)")
        report.rounding = {"method": f"llama.cpp's quantizer on the dequantized {q.get('quant_method')} weights "
                                     "(re-quantized)", "requantized": True}
        return
    if calibration is None:
        return
    import torch

    from toolkit.core import ggml_grid
    from toolkit.core.importance import input_energy

    energy = input_energy(bundle, calibration)
    in_file = blocks.read_blocks(partial)
    placed = {}
    for hf, gname in blocks.gguf_names(bundle).items():
        qtype = in_file.get(gname, ("", None))[0]
        if hf not in energy or qtype not in ggml_grid.GEOMETRY:
            continue
        W = bundle.load(hf, torch.float32)
        grid = ggml_grid.solve(W, qtype, energy[hf])
        placed[gname] = (qtype, blocks.to_file_rows(hf, ggml_grid.pack(grid, grid.codes(W)), bundle.config))
    blocks.patch(partial, placed)
    report.rounding = {"method": "importance-weighted rounding (per-column activation energy, llama.cpp's imatrix "
                                 "idea) on llama.cpp's grids", "tensors": len(placed),
                       "calibration_tokens": int(calibration.numel())}


def llama_quantize(bundle: ModelBundle, partial: Path, outtype: str, threads: int,
                progress: Callable[[str, int, int], None] | None) -> GGUFReport:
    """llama.cpp's quantizer on an f32 file; its per-tensor fallbacks (rows not a multiple of 256) are reported."""
    import ctypes
    import tempfile
    import time

    import llama_cpp

    from exporters.gguf.readback import tensor_types

    t0 = time.perf_counter()
    source = partial.with_name(partial.name + ".f32")
    try:
        base = write_gguf(bundle, source, "f32", progress, direct=False)  # read again at once by the quantizer
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMA_QUANTIZED[outtype])
        params.nthread = threads
        # llama.cpp reports fallbacks through its log: on the C-level stderr, or through llama-cpp-python's
        # Python log callback (sys.stderr); capture both
        with tempfile.TemporaryFile() as log, contextlib.redirect_stderr(io.StringIO()) as py_log:
            with redirected(2, log.fileno()):
                rc = llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params))
            log.seek(0)
            lines = (log.read().decode("utf-8", "replace") + py_log.getvalue()).splitlines()
    finally:
        source.unlink(missing_ok=True)
    if rc != 0:
        raise ToolkitError(f"llama.cpp's quantizer failed ({rc}): {' '.join(lines[-2:])[:300]}",
                           "rerun with --verbose; try --outtype q8_0")
    fallbacks = [" ".join(line.replace("warning:", "").split()) for line in lines if "falling back" in line]
    return GGUFReport(str(partial), base.arch, outtype, partial.stat().st_size, base.n_params, fallbacks,
                      time.perf_counter() - t0, tensor_types=dict(Counter(tensor_types(partial).values())),
                      warnings=base.warnings)


def llama_blocks(bundle: ModelBundle, ftype: str, threads: int, workdir: Path) -> dict[str, tuple]:
    """llama.cpp's own quantizer on this model: Hugging Face weight name -> (the GGML type llama-quantize gives it
    for `ftype`, its stored blocks in Hugging Face row order), for every quantized 2-D tensor. `quantize int4
    --target gguf:TYPE` solves GPTQ on these types and keeps llama.cpp's blocks where it solves nothing (it gets
    this through RunContext.gguf_blocks: quant and exporters are siblings)."""
    import tempfile

    from exporters.gguf import blocks

    with tempfile.TemporaryDirectory(dir=workdir, prefix=".probe-") as tmp:
        probe = Path(tmp) / "llama.gguf"
        llama_quantize(bundle, probe, ftype, threads, None)
        in_file = blocks.read_blocks(probe)
    return {hf: (in_file[g][0], blocks.from_file_rows(hf, in_file[g][1], bundle.config))
            for hf, g in blocks.gguf_names(bundle).items() if g in in_file}


def run(src: Path, dest: Path, opts, ctx: RunContext) -> Outcome:
    """The target's entry (exporters/gguf/__init__.py): load, export, and the closing line."""
    from toolkit.core.verify import verified_line

    report = export(ctx.load(src), dest, opts.outtype, opts.verify, ctx.force, ctx.threads, ctx.verbose,
                    calib=opts.calib)
    v = report.verification
    checked = f"verified in llama.cpp ({verified_line(v)}), tokenizer identical" if v else "not verified"
    types = ", ".join(f"{n} {k}" for k, n in sorted(report.tensor_types.items()))
    if report.rounding and not report.rounding.get("requantized"):
        checked += f"; {report.rounding['method']}"
    return Outcome(dest, f"{report.arch} {opts.outtype}: {report.size_bytes / 1e6:.1f} MB, "
                         f"{report.bits_per_weight:.2f} bits/weight ({types}), {report.seconds:.1f} s; {checked}",
                   [("fallback", line) for line in report.fallbacks] + [("warning", w) for w in report.warnings],
                   report)

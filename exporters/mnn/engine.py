"""The folder MNN's own LLM engine runs (the C++ `Llm` behind `llm_demo` and the MNN Chat app; `MNN.llm` in the
wheel), written by MNN's own exporter (`llmexport`) in an audited child process, then verified through MNN.llm.

Folder layout (MNN's; llmexport writes all but the last three):
  config.json        the engine's runtime settings: backend_type, thread_num, precision, memory, file names
  llm_config.json    the model for the engine: model_type, sizes, attention mask, jinja chat template + bos/eos
  llm.mnn            the graph (embeddings in; fused attention, RoPE from position_ids; the KV cache in the engine)
  llm.mnn.weight     its weights (16-bit, or 8/4-bit asymmetric min/max blocks)
  llm.mnn.json       the graph's description (MNN writes it; the engine does not read it)
  tokenizer.mtok     the engine's tokenizer
  embeddings_bf16.bin  the token embedding, only when it is not tied to the output head
  export_args.json   the arguments llmexport ran with
  tokenizer.json + tokenizer_config.json   the Hugging Face tokenizer (the toolkit decodes text with it)
  manifest.json      format, quantization, verification (toolkit/core/manifest.py)

What the toolkit adds to llmexport: the checkpoint of any supported source as a plain Hugging Face folder; the
model's own RoPE frequencies (llmexport 0.0.5 computes only default, dynamic-alpha, yarn and longrope: a llama3 or
linear scaled model would export silently wrong); no telemetry; the verification; an atomic destination.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from exporters.mnn import gptq_codes
from exporters.mnn.exporter import MnnReport, check_options, judge_prefill_and_steps, rope_tables
from runtimes import EngineText
from toolkit.core import manifest
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError, VerificationError
from toolkit.core.outputs import atomic_output, check_destination

CHILD = "exporters.mnn.llmexport_child"
ENGINE_FILES = ("config.json", "llm_config.json", "llm.mnn", "llm.mnn.weight", "tokenizer.mtok")
LEFTOVERS = (".export.log", "onnx", "no-such-binary")  # llmexport's log and intermediate ONNX graph
MEMORY_MODES = ("low", "normal")
CHAT_PROBE = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."},
              {"role": "assistant", "content": "7"}, {"role": "user", "content": "Another?"}]


@dataclass
class EngineReport(MnnReport):
    """The module layout's report, plus the engine folder's memory mode and GPTQ carry."""
    memory: str = "low"
    gptq: dict | None = None  # GPTQ's codes carried into MNN's blocks (gptq_codes.carry's figures)


def check_engine(bundle: ModelBundle) -> None:
    """Refuse a family MNN's engine cannot compute, with the reason the architecture table gives."""
    why = bundle.config.fam.mnn_engine_refusal
    if why:
        raise ToolkitError(f"MNN's LLM engine cannot compute a {bundle.config.family} model: {why}",
                           "export it with `--layout module` (the toolkit's own MNN graph, run by `toolkit "
                           "generate`/eval-parity), or to GGUF/ONNX")


def check_memory(memory: str) -> None:
    if memory not in MEMORY_MODES:
        raise ToolkitError(f"--memory {memory} is not a mode of MNN's engine", "choose --memory low or normal")


def llmexport_args(bits: int, group_size: int, hqq: bool, head_bits: int | None = None) -> dict:
    """llmexport's arguments for our options: every weight at the same bits and block, the output head too unless
    `head_bits` says otherwise; the embedding stays 16-bit (bf16, llmexport's default) when it is stored apart from
    a quantized head. Asymmetric blocks: MNN's min/max grid (and what holds GPTQ's zero points)."""
    quant_bit = 16 if bits == 16 else bits
    return {"quant_bit": quant_bit, "quant_block": group_size, "lm_quant_bit": head_bits or quant_bit,
            "lm_quant_block": group_size, "hqq": bool(hqq), "sym": False}


def run_child(hf_dir: Path, dest: Path, args: dict, rope: dict) -> str:
    """llmexport in a child process (exporters/mnn/llmexport_child.py): its output, or the reason it failed."""
    hf_dir, dest = Path(hf_dir).resolve(), Path(dest).resolve()  # the child runs in `dest`: relative paths would move
    request = dest.parent / f".{dest.name}.request.json"
    request.write_text(json.dumps({"hf_dir": str(hf_dir), "dest": str(dest), "args": args, "rope": rope}))
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc = subprocess.run([sys.executable, "-m", CHILD, str(request)], capture_output=True, text=True,
                              errors="replace", env=env, cwd=dest)
    finally:
        request.unlink(missing_ok=True)
    log = proc.stdout + proc.stderr
    from exporters.mnn.llmexport_child import ERROR_PREFIX

    reasons = [line.split(ERROR_PREFIX, 1)[1].strip() for line in log.splitlines() if ERROR_PREFIX in line]
    if proc.returncode != 0 or reasons:
        if any("missing module llmexport" in r for r in reasons):
            raise ToolkitError("MNN's exporter llmexport is not installed", "pip install -e '.[mnn]' "
                                                                          "(llmexport==0.0.5)")
        if "No space left on device" in log:
            raise ToolkitError(f"no space left on the device of {dest.parent} while MNN's exporter wrote the "
                               "folder", "free disk space, or write to another disk with -o; nothing was kept")
        tail = " | ".join(line for line in log.splitlines()[-6:] if line.strip())[-600:]
        raise VerificationError(f"MNN's exporter failed: {'; '.join(reasons) or tail}",
                                "nothing was kept; rerun with --debug and report MNN's output")
    missing = [f for f in ENGINE_FILES if not (dest / f).is_file()]
    if missing:
        raise VerificationError(f"MNN's exporter left no {', '.join(missing)}", "nothing was kept; report this")
    for name in LEFTOVERS:
        path = dest / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return log


def set_runtime_config(folder: Path, memory: str, threads: int = 4) -> None:
    """The engine's runtime settings: CPU, `memory` (low: 8/4-bit weights with int8 dynamic activations, MNN's
    default and faster at decode; normal: float activations, closer to the reference), fp16 where the CPU has it."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update({"backend_type": "cpu", "thread_num": threads, "memory": memory,
                   "precision": config.get("precision", "low")})
    path.write_text(json.dumps(config, indent=4) + "\n")


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name not in ("manifest.json",
                                                                                             "llm.mnn.json"))


def verify(bundle: ModelBundle, folder: Path, bits: int, threads: int = 1) -> dict:
    """Through MNN.llm, the engine a phone runs: tokenizer_encode equal to the model's tokenizer on the verification
    text (special tokens as the tokenizer adds them: Llama-3's BOS, none for Qwen), the chat template rendered as
    the Jinja renders it, and the logits of a prefill of 48 tokens then 16 single tokens through the
    engine's own cache against the reference model on the source weights, judged by the shared verifier's bar for
    the bit width."""
    from runtimes import RUNTIMES, Stepping
    from toolkit.core.verify import VERIFY_TEXT, first_difference

    runtime: Stepping = RUNTIMES["mnn"].load(folder, threads=threads)
    engine_text: EngineText = runtime
    want = bundle.tokenizer.encode(VERIFY_TEXT)
    got_ids = engine_text.engine_ids(VERIFY_TEXT)
    if got_ids != want:
        raise VerificationError(f"MNN's tokenizer (tokenizer.mtok) encodes the verification text differently from "
                                f"the model's tokenizer (first difference at token "
                                f"{first_difference(want, got_ids)})", "the export is not kept; report this")
    chat = check_chat_template(bundle, engine_text)
    result = judge_prefill_and_steps(bundle, runtime, bits, "MNN's engine logits")
    return {**result, "engine": "MNN.llm", "chat_template": chat}


def check_chat_template(bundle: ModelBundle, engine_text: EngineText) -> str:
    """The engine's apply_chat_template (MNN's minja) must render what the model's Jinja template renders."""
    if not bundle.tokenizer.chat_template:
        return "none"
    want = bundle.tokenizer.render_chat(CHAT_PROBE)
    got = engine_text.engine_chat(CHAT_PROBE)
    if got != want:
        at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
        raise VerificationError(f"MNN's engine renders the chat template differently from its Jinja (first "
                                f"difference at character {at}: {want[at:at + 30]!r} vs {got[at:at + 30]!r})",
                                "the export is not kept; report this")
    return "equal to the Jinja render"


def gptq_plan(bundle: ModelBundle, bits: int, group_size: int, hqq: bool) -> tuple[bool, str]:
    """(carry GPTQ's codes?, the warning when a GPTQ checkpoint is re-quantized instead)."""
    group = gptq_codes.gptq_group_size(bundle)
    if group is None:
        return False, ""
    mnn_group = 0 if group == -1 else group
    if bits == 4 and group_size == mnn_group and not hqq:
        return True, ""
    return False, (f"the GPTQ checkpoint's weights were re-quantized by MNN's exporter ({bits}-bit, group size "
                   f"{group_size or 'per channel'}{', hqq' if hqq else ''}); `--bits 4 --group-size {mnn_group}` "
                   "without --hqq writes GPTQ's own codes")


def write_manifest(folder: Path, bundle: ModelBundle, report: EngineReport, source_hash=None) -> None:
    inv_freq, attention_scaling = rope_tables(bundle)
    details = {"layout": "engine", "memory_mode": report.memory, "engine_config": "config.json",
               "rope": {"inv_freq_from": "the model's config (toolkit/core/rope.py), set in llmexport's graph",
                        "attention_scaling": attention_scaling}}
    if report.gptq:
        details["from_quantized_checkpoint"] = (f"GPTQ's codes and scales in MNN's blocks for "
                                                f"{report.gptq['carried_layers']} decoder layers (weight = min + "
                                                f"scale * (code - 8), min = scale * (8 - zero)); "
                                                f"{len(report.gptq['requantized_layers'])} re-quantized; the output "
                                                f"head 16-bit, as in the checkpoint")
    elif bundle.provenance.get("quantization"):
        details["from_quantized_checkpoint"] = ("the checkpoint's dequantized weights, re-quantized by MNN's "
                                                "exporter" if report.bits < 16 else "its dequantized weights, 16-bit")
    method = (f"llmexport {report.bits}-bit asymmetric min/max blocks" + (" + HQQ" if report.hqq else "")
              if not report.gptq else "GPTQ codes carried into MNN's 4-bit asymmetric blocks")
    quantization = None if report.bits == 16 else {
        "method": method, "bits": report.bits, "group_size": report.group_size, "hqq": report.hqq}
    manifest.write(folder / manifest.FOLDER_FILE, manifest.build(
        format="mnn", runtime="mnn", artifact=Path(report.path).name, bundle=bundle,
        dtype={16: "float16", 8: "int8", 4: "int4"}[report.bits], size_bytes=report.size_bytes,
        versions=manifest.package_versions("MNN", "llmexport", "torch", "transformers", "edge-toolkit"),
        verification=report.verification or None, source_hash=source_hash, quantization=quantization,
        warnings=report.warnings, details=details))


def export(bundle: ModelBundle, out: Path, bits: int = 4, group_size: int = 64, hqq: bool = False,
           memory: str = "low", verify_model: bool = True, force: bool = False, threads: int = 1,
           log=lambda line: None) -> EngineReport:
    from toolkit.checkpoints.hf_writer import save_hf

    out = Path(out)
    if importlib.util.find_spec("llmexport") is None:
        raise ToolkitError("MNN's exporter llmexport is not installed", "pip install -e '.[mnn]' (llmexport==0.0.5), "
                                                                      "or export with --layout module")
    check_engine(bundle)
    check_options(bundle, bits, group_size, hqq)
    check_memory(memory)
    check_destination(out, force)
    source_hash = manifest.SourceHash(bundle.provenance)
    inv_freq, attention_scaling = rope_tables(bundle)
    carry_gptq, requantized = gptq_plan(bundle, bits, group_size, hqq)
    t0 = time.perf_counter()
    with atomic_output(out, force, directory=True) as work:
        with tempfile.TemporaryDirectory(prefix="hf-", dir=work.parent) as hf_dir:
            import torch

            log("writing the checkpoint as a Hugging Face folder for MNN's exporter")
            save_hf(bundle, hf_dir, dtype=torch.float32)
            log(f"MNN's exporter (llmexport): {bits}-bit weights")
            # GPTQ keeps the output head unquantized; so does its MNN folder (quantizing it is re-quantizing)
            run_child(Path(hf_dir), work, llmexport_args(bits, group_size, hqq, 16 if carry_gptq else None),
                      {"inv_freq": [float(x) for x in inv_freq], "attention_scaling": attention_scaling})
        set_runtime_config(work, memory)
        bundle.tokenizer.save(work)
        gptq = None
        if carry_gptq:
            log("writing GPTQ's codes into MNN's 4-bit blocks")
            gptq = gptq_codes.carry(bundle, work, group_size)
        report = EngineReport(str(out), bits, group_size, hqq, folder_size(work), 0.0, memory=memory, gptq=gptq)
        report.warnings += [requantized] if requantized else []
        report.warnings += [f"re-quantized by MNN, not GPTQ's codes: {line}"
                            for line in (gptq or {}).get("requantized_layers", [])]
        write_manifest(work, bundle, report, source_hash)
        if verify_model:
            log("verifying through MNN.llm")
            report.verification = verify(bundle, work, bits, threads)
        report.seconds = time.perf_counter() - t0
        write_manifest(work, bundle, report, source_hash)
    return report

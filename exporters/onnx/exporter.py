"""`toolkit export onnx`: build the graph, verify it in ONNX Runtime against the reference
model, then move the folder into place.

Folder layout: model.onnx + model.onnx.data (all weights, one file), config.json (Hugging Face config),
tokenizer.json + tokenizer_config.json, manifest.json (toolkit/core/manifest.py: variant, opset, versions,
verification) and, for the ort variant, genai_config.json.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from exporters.onnx import MODEL_FILE
from runtimes import Batching
from toolkit.core import manifest
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError, VerificationError
from toolkit.core.outputs import atomic_output, check_destination
from toolkit.core.targets import Outcome, RunContext

VARIANTS = ("portable", "ort")
OPSETS = (17, 20, 23)
DATA_FILE = "model.onnx.data"
DECODE_STEPS = 16
PAD = 3  # left padding of the first verification prompt
PROMPT_TOKENS = 48


@dataclass
class OnnxReport:
    path: str
    variant: str
    opset: int
    ir_version: int
    size_bytes: int
    nodes: dict[str, int]
    verification: dict | None = None
    warnings: list[str] = field(default_factory=list)


def check_opset(opset: int) -> int:
    """The opset must be one we build and the installed ONNX Runtime must run it (probed with a one-node graph)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if opset not in OPSETS:
        raise ToolkitError(f"opset {opset} is not offered", f"choose --opset {', '.join(map(str, OPSETS))} (17 is "
                                                            "what MNN's converter reads)")
    opsets = [helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)]
    ir = helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    probe = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]), opset_imports=opsets)
    probe.ir_version = ir
    try:
        ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ToolkitError(f"the installed ONNX Runtime {ort.__version__} cannot run opset {opset} / IR {ir} "
                           f"({str(e).splitlines()[0][:160]})", "choose a lower --opset or upgrade onnxruntime"
                           ) from None
    return ir


def check_variant(bundle: ModelBundle, variant: str) -> None:
    if variant not in VARIANTS:
        raise ToolkitError(f"unknown variant '{variant}'", "choose --variant portable or --variant ort")
    if variant == "ort" and bundle.config.fam.moe:
        raise ToolkitError(f"--variant ort cannot build {bundle.config.family} (mixture of experts): the fused "
                           "ONNX Runtime graph covers the dense families llama, qwen2 and qwen3",
                           "use --variant portable, which covers every family")


def verification_batch_for(tokenizer, vocab_size: int) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Two rows of the shared verification text (toolkit/core/verify.py), the first left-padded, and the tokens fed on
    each decode step: each row's own continuation (fixed, not sampled, so both sides see the same inputs whatever
    they predict)."""
    from toolkit.core.verify import verification_ids

    ids = verification_ids(tokenizer, vocab_size, 2 * PROMPT_TOKENS + 2 * DECODE_STEPS)
    first, second = ids[:PROMPT_TOKENS], ids[PROMPT_TOKENS + DECODE_STEPS:2 * PROMPT_TOKENS + DECODE_STEPS]
    pad = tokenizer.pad_id or 0
    rows = np.array([[pad] * PAD + first[PAD:], second], np.int64)
    mask = np.ones_like(rows)
    mask[0, :PAD] = 0
    steps = [[ids[PROMPT_TOKENS + s], ids[2 * PROMPT_TOKENS + DECODE_STEPS + s]] for s in range(DECODE_STEPS)]
    return rows, mask, steps


class TorchReference:
    """The reference model behind the same `forward(ids, mask, state)` interface as the ONNX runtime."""

    def __init__(self, bundle: ModelBundle, max_len: int):
        from toolkit.core.model import build_model

        self.model, self.config, self.max_len = build_model(bundle), bundle.config, max_len

    def forward(self, ids: np.ndarray, mask: np.ndarray, cache=None):
        from toolkit.core.model import KVCache

        if cache is None:
            cache = KVCache(self.config, ids.shape[0], self.max_len, torch.float32, "cpu")
        with torch.no_grad():
            logits = self.model(torch.from_numpy(ids), cache=cache, attention_mask=torch.from_numpy(mask))
        return logits.numpy(), cache


def paired_logits(reference: Batching, candidate: Batching, tokenizer, vocab_size: int
                  ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Both through the same batch: prefill of 2 prompts (one left-padded) + DECODE_STEPS cached steps. Returns the
    logits of every real (non-padding) position of both, [positions, vocab], and how the batch was made."""
    rows, mask, steps = verification_batch_for(tokenizer, vocab_size)
    ref_state = got_state = None
    ids, attn = rows, mask
    refs, gots, prefill_diff = [], [], 0.0
    for step in range(len(steps) + 1):
        ref, ref_state = reference.forward(ids, attn, ref_state)
        got, got_state = candidate.forward(ids, attn, got_state)
        real = attn[:, -ids.shape[1]:].astype(bool)
        refs.append(ref[real])
        gots.append(got[real])
        if step == 0:
            prefill_diff = float(np.abs(got[real] - ref[real]).max())
        if step < len(steps):
            ids = np.array([[t] for t in steps[step]], np.int64)
            attn = np.concatenate([attn, np.ones((2, 1), np.int64)], axis=1)
    info = {"batch": 2, "left_padding": PAD, "prompt_tokens": PROMPT_TOKENS, "decode_steps": len(steps),
            "max_abs_diff_prefill": prefill_diff}
    return np.concatenate(refs), np.concatenate(gots), info


def compare(reference: Batching, candidate: Batching, tokenizer, vocab_size: int) -> dict:
    """The shared verifier's figures of `candidate` against `reference` on the verification batch (not judged)."""
    from toolkit.core.verify import figures

    ref, got, info = paired_logits(reference, candidate, tokenizer, vocab_size)
    fig = figures(ref, got)
    return {**info, **fig, "argmax_agreement": fig["top1"]}


def check_tokenizer(bundle: ModelBundle, folder: Path, what: str) -> None:
    """The tokenizer saved beside the graph must encode the verification text as the model's own does."""
    from toolkit.core.tokenizer import Tokenizer
    from toolkit.core.verify import VERIFY_TEXT, first_difference

    want = bundle.tokenizer.encode(VERIFY_TEXT, add_bos=False)
    got = Tokenizer.from_dir(folder).encode(VERIFY_TEXT, add_bos=False)
    if got != want:
        first = first_difference(want, got)
        raise VerificationError(f"the tokenizer saved in the {what} folder encodes differently from the model's "
                                f"(first difference at token {first})", "the export is not kept; report this")


def verify(bundle: ModelBundle, folder: Path, threads: int = 1) -> dict:
    from runtimes import RUNTIMES
    from toolkit.core.verify import judge

    check_tokenizer(bundle, folder, "ONNX")
    reference = TorchReference(bundle, PROMPT_TOKENS + DECODE_STEPS)
    ref, got, info = paired_logits(reference, RUNTIMES["onnxruntime"].load(folder, threads=threads),
                                   bundle.tokenizer, bundle.config.vocab_size)
    result = judge(ref, got, "onnx:fp32", "ONNX Runtime's logits")
    return {**info, **result, "argmax_agreement": result["top1"], "tokenizer_match": True}


def write_side_files(bundle: ModelBundle, folder: Path, variant: str) -> None:
    from toolkit.core.arch import config_to_hf

    (folder / "config.json").write_text(json.dumps(config_to_hf(bundle.config), indent=2) + "\n")
    bundle.tokenizer.save(folder)
    if variant == "ort":
        (folder / "genai_config.json").write_text(json.dumps(genai_config(bundle), indent=2) + "\n")


def genai_config(bundle: ModelBundle) -> dict:
    """onnxruntime-genai's description of the graph: names, shapes, and plain greedy search defaults."""
    cfg, tok = bundle.config, bundle.tokenizer
    eos = tok.end_of_turn_ids() or ([tok.eos_id] if tok.eos_id is not None else [0])
    return {
        "model": {
            "bos_token_id": tok.bos_id if tok.bos_id is not None else eos[0],
            "context_length": cfg.max_position_embeddings,
            "eos_token_id": eos if len(eos) > 1 else eos[0],
            "pad_token_id": tok.pad_id if tok.pad_id is not None else eos[0],
            "type": {"qwen2": "qwen2", "qwen3": "qwen3"}.get(cfg.family, "llama"),
            "vocab_size": cfg.vocab_size,
            "decoder": {
                "filename": MODEL_FILE, "head_size": cfg.head_dim, "hidden_size": cfg.hidden_size,
                "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
                "num_key_value_heads": cfg.num_kv_heads,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        # GroupQueryAttention (the only attention of the ort variant, the one folder that gets this file) writes
        # each new key/value into the past buffer in place: genai then keeps one buffer of max_length instead of
        # a cache copied every step (decode 1.22x on SmolLM2-135M int4 after a 582-token prompt, as fast as
        # ONNX Runtime's runner, which binds the buffer the same way)
        "search": {"do_sample": False, "max_length": cfg.max_position_embeddings, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def save_model(model, folder: Path) -> None:
    import onnx

    onnx.save_model(model, str(folder / MODEL_FILE), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA_FILE, size_threshold=1024)


def node_counts(model) -> dict[str, int]:
    from collections import Counter

    return dict(Counter(n.op_type for n in model.graph.node).most_common())


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.startswith(MODEL_FILE))


def write_manifest(folder: Path, bundle: ModelBundle, report: OnnxReport, source_hash=None) -> None:
    details = {"variant": report.variant, "opset": report.opset, "ir_version": report.ir_version,
               "nodes": report.nodes}
    quantization = None
    if bundle.provenance.get("quantization"):
        imported = report.nodes.get("MatMulNBits", 0)
        details["from_quantized_checkpoint"] = (
            f"GPTQ codes, scales and zero points imported into {imported} MatMulNBits nodes as they are "
            "(accuracy_level 0)" if imported else "the checkpoint's dequantized weights, in fp32")
        if imported:
            q = bundle.provenance["quantization"]
            quantization = {"method": "GPTQ codes imported into MatMulNBits", "bits": q.get("bits"),
                            "group_size": q.get("group_size"), "sym": q.get("sym")}
    manifest.write(folder / manifest.FOLDER_FILE, manifest.build(
        format="onnx", runtime="onnxruntime", artifact=Path(report.path).name, bundle=bundle,
        dtype="int4" if quantization else "float32", size_bytes=report.size_bytes,
        versions=manifest.package_versions("onnx", "onnxruntime", "onnxruntime-genai", "torch", "edge-toolkit"),
        verification=report.verification or None, source_hash=source_hash, quantization=quantization,
        warnings=report.warnings, details=details))


def export(bundle: ModelBundle, out: Path, variant: str = "portable", opset: int = 20, verify_graph: bool = True,
           force: bool = False, threads: int = 1) -> OnnxReport:
    import onnx

    from exporters.onnx.graph import build

    out = Path(out)
    check_variant(bundle, variant)
    ir = check_opset(opset)
    check_destination(out, force)
    source_hash = manifest.SourceHash(bundle.provenance)
    with atomic_output(out, force, directory=True) as work:
        model = build(bundle, opset, variant)
        if variant == "portable":  # the ort variant's contrib ops are unknown to the onnx checker
            onnx.checker.check_model(model)
        nodes = node_counts(model)
        save_model(model, work)
        del model
        write_side_files(bundle, work, variant)
        report = OnnxReport(str(out), variant, opset, ir, folder_size(work), nodes)
        if verify_graph:
            report.verification = verify(bundle, work, threads)
        write_manifest(work, bundle, report, source_hash)
    return report


def run(src: Path, dest: Path, opts, ctx: RunContext) -> Outcome:
    """The target's entry (exporters/onnx/__init__.py): check the opset before loading, export, the closing line."""
    from toolkit.core.verify import verified_line

    check_opset(opts.opset)
    bundle = ctx.load(src)
    check_variant(bundle, opts.variant)
    report = export(bundle, dest, opts.variant, opts.opset, opts.verify, ctx.force, ctx.threads)
    v = report.verification
    checked = (f"verified in ONNX Runtime over prefill + {v['decode_steps']} cached steps, batch 2 left-padded "
               f"({verified_line(v)})") if v else "not verified"
    top = ", ".join(f"{k} {n}" for k, n in list(report.nodes.items())[:6])
    return Outcome(dest, f"{opts.variant} opset {report.opset} (IR {report.ir_version}): "
                         f"{report.size_bytes / 1e6:.1f} MB, {sum(report.nodes.values())} nodes ({top}, ...); "
                         f"{checked}", [("warning", w) for w in report.warnings], report)

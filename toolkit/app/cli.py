"""`toolkit`: the command line. Thin: parse, call, print.

Contract for every command (DESIGN.md): inputs positional, outputs `-o/--out`; an existing output is refused unless
`--force`; exit 0 done, 1 a verification failed, 2 bad input with `error: <what> (hint: <how>)` as the last stderr
line and no traceback unless `--debug`. `--debug` and `--verbose` are accepted anywhere on the line.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

try:  # typer >= 0.20 vendors click; its exceptions live there
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

from toolkit.app.loader_options import LoaderOptions, loader_options
from toolkit.core.errors import ToolkitError

app = typer.Typer(name="toolkit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Take small language models to the edge: train, convert, quantize, export, and prove parity.")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


class Flags:
    debug = False
    verbose = False


ForceOpt = Annotated[bool, typer.Option(help="Replace an existing output.")]
VerifyThreadsOpt = Annotated[int, typer.Option(help="CPU threads for verification.")]


def _default_dest(src: Path, suffix: str) -> Path:
    """DESIGN.md's default output: named after the input (without .pth) and the variant, beside it."""
    return Path(f"{str(src).rstrip('/').removesuffix('.pth')}{suffix}")


# --- train -----------------------------------------------------------------------------------------------------
@app.command()
def train(
    text: Annotated[Optional[list[Path]], typer.Option("--text", help="UTF-8 text file(s) to train on; the last "
                                                                     "--heldout-frac of it is held out. Default: "
                                                                     "the embedded standard-library corpus.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder (Hugging Face layout). "
                                                                       "Default: runs/<text name>.")] = None,
    with_default_corpus: Annotated[bool, typer.Option(help="Also train on the embedded corpus when --text is "
                                                           "given (held-out text still comes from --text).")] = False,
    heldout_frac: Annotated[float, typer.Option(help="Share of the text held out, split at a character offset.")] = 0.1,
    tokenizer: Annotated[Optional[Path], typer.Option(help="Use this tokenizer instead of training a byte-level "
                                                           "BPE.")] = None,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary of the trained tokenizer.")] = 4096,
    arch: Annotated[str, typer.Option(help="llama (MiniMind2-style), qwen3 (minimind-3-style, QK-norm) or "
                                           "nanochat (NanoChat era A: ReLU², weightless norms, softcap 15, "
                                           "untied head, RoPE base 1e4).")] = "llama",
    hidden: Annotated[int, typer.Option(help="Hidden size (multiples of 256 let llama.cpp's K-quants apply).")] = 256,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 4,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    kv_heads: Annotated[int, typer.Option(help="Key/value heads (GQA).")] = 2,
    ffn: Annotated[Optional[int], typer.Option(help="MLP intermediate size. Default: 768; 4 x --hidden for "
                                                    "nanochat.")] = None,
    seq_len: Annotated[int, typer.Option(help="Training sequence length (and held-out chunk length).")] = 256,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch (per process).")] = 16,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 400,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 2e-3,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps, then cosine decay to --min-lr.")] = 50,
    min_lr: Annotated[float, typer.Option(help="Learning rate at the last step.")] = 0.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Gradient norm clip.")] = 1.0,
    eval_every: Annotated[int, typer.Option(help="Held-out perplexity every N steps (best one is kept).")] = 100,
    save_every: Annotated[int, typer.Option(help="Resumable state every N steps.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed for weights and batches.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (bf16/fp16 autocast on CUDA).")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads (default: torch's choice).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue an earlier run: its folder, or the "
                                                        "<out>.train_state.pt an interrupted run leaves. The run's "
                                                        "recipe (model, data, optimizer) is kept; --steps may "
                                                        "grow.")] = None,
    force: ForceOpt = False,
):
    """Pretrain a MiniMind-style model from scratch; writes a Hugging Face folder with heldout.txt and calib.txt.

    Run under `torchrun --nproc_per_node N` for PyTorch DDP (gloo on CPU, nccl on CUDA)."""
    from toolkit.app.train import TrainOptions
    from toolkit.app.train import train as run_train

    name = text[0].stem if text else "default"
    dest = out_dir or Path("runs") / name
    opts = TrainOptions(out=str(dest), texts=[str(t) for t in text or []], with_default_corpus=with_default_corpus,
                        heldout_frac=heldout_frac, tokenizer=str(tokenizer) if tokenizer else None,
                        vocab_size=vocab_size, arch=arch, hidden_size=hidden, num_layers=layers, num_heads=heads,
                        num_kv_heads=kv_heads, intermediate_size=ffn or (4 * hidden if arch == "nanochat" else 768),
                        seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, steps=steps, lr=lr,
                        warmup=warmup, min_lr=min_lr, weight_decay=weight_decay, grad_clip=grad_clip,
                        eval_every=eval_every, save_every=save_every, seed=seed, device=device, threads=threads,
                        resume=str(resume) if resume else None, force=force)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    from toolkit.app.progress import step_progress

    with step_progress(err, opts.steps, enabled=main_rank) as progress:
        summary = run_train(opts, progress=progress)
    if main_rank:
        err.print(f"held-out perplexity {summary['first_heldout_ppl']:.2f} (first eval) -> "
                  f"{summary['best_heldout_ppl']:.2f} (best, step {summary['best_step']}); "
                  f"{summary['parameters'] / 1e6:.2f}M parameters, {summary['seconds']:.0f} s")
        out.print(str(dest))


# --- info ------------------------------------------------------------------------------------------------------
@app.command()
@loader_options
def info(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint: Hugging Face folder, GGUF file, MiniMind .pth, NanoChat "
                                              "folder, or a trained run.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    loader: LoaderOptions = LoaderOptions(),
):
    """Architecture, parameters, dtype, size, tokenizer and tied embeddings of a checkpoint (reads headers only)."""
    from toolkit.core import rope

    bundle = loader.load(ckpt)
    cfg, tok = bundle.config, bundle.tokenizer
    size = sum(f.stat().st_size for f in Path(ckpt).rglob("*") if f.is_file()) if Path(ckpt).is_dir() \
        else Path(ckpt).stat().st_size
    report = {
        "path": str(ckpt), "format": bundle.provenance.get("format"), "era": bundle.provenance.get("era"),
        "arch": cfg.family, "description": cfg.fam.description, "hf_class": cfg.fam.hf_architecture,
        "parameters": bundle.num_parameters(), "dtypes": bundle.dtypes(), "size_bytes": size,
        "tied_embeddings": cfg.tie_word_embeddings,
        "stored_types": bundle.provenance.get("gguf_tensor_types"),  # a GGUF's block types (read dequantized)
        "config": {k: v for k, v in cfg.to_dict().items() if k not in ("extra", "family")},
        "tokenizer": {"type": tok.kind, "vocab_size": tok.vocab_size, "bos": tok.bos_id, "eos": tok.eos_id,
                      "pad": tok.pad_id, "add_bos": tok.add_bos, "chat_template": bool(tok.chat_template)},
    }
    if as_json:
        out.print_json(json.dumps(report))
        return
    rows = [("path", report["path"]), ("format", f"{report['format']}" + (f" (era {report['era']})"
                                                                          if report["era"] else "")),
            ("arch", f"{cfg.family}: {cfg.fam.description}"),
            ("parameters", f"{report['parameters']:,} ({report['parameters'] / 1e6:.2f}M)"),
            ("dtype", ", ".join(f"{k} {v:,}" for k, v in report["dtypes"].items())
             + (f" (dequantized from GGUF {', '.join(report['stored_types'])})" if report["stored_types"] else "")),
            ("size", f"{size / 1e6:.1f} MB"),
            ("shape", f"hidden {cfg.hidden_size}, layers {cfg.num_layers}, heads {cfg.num_heads}/{cfg.num_kv_heads} "
                      f"(head_dim {cfg.head_dim}), ffn {cfg.intermediate_size or cfg.moe_intermediate_size}, "
                      f"vocab {cfg.vocab_size}"),
            ("rope / norm", f"{rope.describe(cfg)}, rms eps {cfg.rms_norm_eps:g}"),
            ("tied embeddings", str(cfg.tie_word_embeddings)),
            ("tokenizer", f"{tok.kind}, {tok.vocab_size} tokens, bos {tok.bos_id}, eos {tok.eos_id}, "
                          f"add_bos {tok.add_bos}, chat template {'yes' if tok.chat_template else 'no'}")]
    if cfg.fam.moe:
        rows.insert(5, ("experts", f"{cfg.num_experts} experts, top-{cfg.num_experts_per_tok}"
                                   + (f", shared {cfg.shared_expert_intermediate_size}" if cfg.fam.shared_expert
                                      else "")))
    for key, value in rows:
        out.print(f"[bold]{key:>16}[/bold]  {value}", highlight=False)


# --- generate --------------------------------------------------------------------------------------------------
@app.command()
@loader_options
def generate(
    model: Annotated[Path, typer.Argument(help="Checkpoint or exported artifact.")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue (or the user turn with --chat).")],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="Sampling seed.")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap the prompt in the model's chat template.")] = False,
    system: Annotated[Optional[str], typer.Option(help="System message with --chat.")] = None,
    runtime: Annotated[Optional[str], typer.Option(help="Runtime name (default: chosen by the artifact).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads.")] = 1,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    loader: LoaderOptions = LoaderOptions(),
):
    """Generate text, streamed to stdout; prefill and decode speed go to stderr."""
    import runtimes
    from toolkit.core.sampling import StreamDecoder, make_sampler

    if max_new_tokens <= 0:
        raise ToolkitError(f"--max-new-tokens must be positive, got {max_new_tokens}", "pass e.g. -n 64")
    if device not in ("cpu", "cuda"):
        raise ToolkitError(f"unknown device '{device}'", "use --device cpu or cuda")
    if threads <= 0:
        raise ToolkitError(f"--threads must be positive, got {threads}", "pass e.g. --threads 1")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ToolkitError("--device cuda but no CUDA device is visible", "use --device cpu")
    spec = runtimes.choose(model, runtime)  # a .gguf in llama.cpp, an export folder in its engine, else torch
    sampler = make_sampler(temperature, top_k, top_p, seed)
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    # each runtime tokenizes with what its artifact carries; the loader options reach only checkpoint loaders
    rt = spec.load(model, threads=threads, device=device, verbose=Flags.verbose, **asdict(loader))
    ids, stops = rt.chat_ids(messages) if chat else (rt.prompt_ids(prompt), [])
    if not ids:
        raise ToolkitError("the prompt is empty after tokenization", "pass a non-empty --prompt")
    stream = StreamDecoder(rt.detokenize)
    if not chat:
        sys.stdout.write(prompt)

    def emit(token: int) -> None:
        sys.stdout.write(stream.push(token))
        sys.stdout.flush()

    result = rt.generate(ids, max_new_tokens, sampler, stops, on_token=emit)
    sys.stdout.write(stream.flush() + "\n")
    err.print(f"[dim]{rt.label}: prompt {result.prompt_tokens} tokens, {result.prefill_tps:.1f} tok/s prefill; "
              f"{len(result.ids)} new tokens, {result.decode_tps:.1f} tok/s decode ({result.stopped_by})[/dim]")


# --- convert ---------------------------------------------------------------------------------------------------
def _verified(v: dict) -> str:
    """The shared verifier's figures and the bar they were judged by, for the closing line of an export."""
    from toolkit.core.verify import summary

    bar = ", ".join(f"{k.replace('max_', '').replace('min_', '')} {val:g}" for k, val in v["bar"].items())
    return f"{summary(v)}; bar for {v['judged_as']}: {bar}"


@app.command()
@loader_options
def convert(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint to convert.")],
    to: Annotated[str, typer.Option("--to", help="Target format: hf (a folder transformers loads).")] = "hf",
    out_dir: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder. Default: <ckpt>-hf/.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16 (default: as stored).")] = None,
    force: ForceOpt = False,
    loader: LoaderOptions = LoaderOptions(),
):
    """Save any checkpoint as a Hugging Face folder (config.json, safetensors, tokenizer) for transformers."""
    import torch

    from toolkit.checkpoints.hf_writer import save_hf
    from toolkit.core.outputs import atomic_output, check_destination

    if to != "hf":
        raise ToolkitError(f"unknown target format '{to}'", "use --to hf; for GGUF/ONNX/MNN see `toolkit export`")
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype is not None and dtype not in dtypes:
        raise ToolkitError(f"unknown dtype '{dtype}'", "use float32, float16 or bfloat16")
    dest = out_dir or Path(f"{str(ckpt).rstrip('/')}-hf")
    check_destination(dest, force)
    bundle = loader.load(ckpt)
    with atomic_output(dest, force, directory=True) as work:
        save_hf(bundle, work, dtypes.get(dtype) if dtype else None)
    err.print(f"{bundle.config.family} ({bundle.config.fam.hf_architecture}), "
              f"{bundle.num_parameters() / 1e6:.2f}M parameters")
    out.print(str(dest))


# --- export --------------------------------------------------------------------------------------------------
export_app = typer.Typer(no_args_is_help=True, help="Export a checkpoint to a runtime's format, verified against the "
                                                     "reference model before it is kept.")
app.add_typer(export_app, name="export")


@export_app.command("gguf")
@loader_options
def export_gguf(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint to export.")],
    out_file: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output FILE.gguf. Default: "
                                                                         "<ckpt>-<outtype>.gguf.")] = None,
    outtype: Annotated[str, typer.Option(help="f32, f16, bf16, q8_0, q4_0, or llama.cpp's K-quants q4_k_m, q5_k_m, "
                                              "q6_k (norms and routers stay f32).")] = "f16",
    verify: Annotated[bool, typer.Option(help="Load the file in llama.cpp and compare logits and tokenization "
                                              "with the reference model before keeping it.")] = True,
    threads: VerifyThreadsOpt = 1,
    force: ForceOpt = False,
    loader: LoaderOptions = LoaderOptions(),
):
    """GGUF for llama.cpp and Ollama; writes FILE.gguf and FILE.manifest.json."""
    from exporters import get as get_exporter
    from toolkit.core.outputs import check_destination

    dest = out_file or _default_dest(ckpt, f"-{outtype}.gguf")
    check_destination(dest, force)
    bundle = loader.load(ckpt)
    report = get_exporter("gguf").export(bundle, dest, outtype, verify, force, threads, Flags.verbose)
    for line in report.fallbacks:
        err.print(f"[yellow]fallback[/yellow] {line}")
    for line in report.warnings:
        err.print(f"[yellow]warning[/yellow] {line}")
    v = report.verification
    checked = f"verified in llama.cpp ({_verified(v)}), tokenizer identical" if v else "not verified"
    types = ", ".join(f"{n} {k}" for k, n in sorted(report.tensor_types.items()))
    err.print(f"{report.arch} {outtype}: {report.size_bytes / 1e6:.1f} MB, {report.bits_per_weight:.2f} bits/weight "
              f"({types}), "
              f"{report.seconds:.1f} s; {checked}")
    out.print(str(dest))


@export_app.command("onnx")
@loader_options
def export_onnx(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint to export.")],
    out_dir: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder. Default: "
                                                                        "<ckpt>-onnx-<variant>.")] = None,
    variant: Annotated[str, typer.Option(help="portable: standard ONNX ops, every family, Optimum's I/O names. "
                                              "ort: ONNX Runtime's fused ops (GroupQueryAttention, "
                                              "SkipSimplifiedLayerNormalization, packed QKV) + genai_config.json "
                                              "for onnxruntime-genai; dense llama/qwen2/qwen3.")] = "portable",
    opset: Annotated[int, typer.Option(help="ONNX opset: 17 (what MNN's converter reads), 20, or 23 "
                                            "(RMSNormalization op).")] = 20,
    verify: Annotated[bool, typer.Option(help="Run the graph in ONNX Runtime (batch of 2 left-padded prompts, "
                                              "prefill + 16 cached steps) and compare logits with the reference "
                                              "model before keeping it.")] = True,
    threads: VerifyThreadsOpt = 1,
    force: ForceOpt = False,
    loader: LoaderOptions = LoaderOptions(),
):
    """ONNX (fp32) for ONNX Runtime: model.onnx + model.onnx.data with a KV cache, tokenizer and manifest.json."""
    from exporters import get as get_exporter
    from exporters.onnx import check_opset, check_variant
    from toolkit.core.outputs import check_destination

    dest = out_dir or _default_dest(ckpt, f"-onnx-{variant}")
    check_destination(dest, force)
    check_opset(opset)
    bundle = loader.load(ckpt)
    check_variant(bundle, variant)
    report = get_exporter("onnx").export(bundle, dest, variant, opset, verify, force, threads)
    v = report.verification
    checked = (f"verified in ONNX Runtime over prefill + {v['decode_steps']} cached steps, batch 2 left-padded "
               f"({_verified(v)})") if v else "not verified"
    top = ", ".join(f"{k} {n}" for k, n in list(report.nodes.items())[:6])
    err.print(f"{variant} opset {report.opset} (IR {report.ir_version}): {report.size_bytes / 1e6:.1f} MB, "
              f"{sum(report.nodes.values())} nodes ({top}, ...); {checked}")
    out.print(str(dest))


@export_app.command("mnn")
@loader_options
def export_mnn(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint to export.")],
    out_dir: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder. Default: "
                                                                        "<ckpt>-mnn-<bits>bit.")] = None,
    bits: Annotated[int, typer.Option(help="Weight bits: 16 (fp16), 8 or 4 (block-wise, MNN's min/max grid; run "
                                           "with MNN's low-memory int8 kernels).")] = 4,
    group_size: Annotated[int, typer.Option(help="Input columns per scale for 8/4 bits; must divide every weight's "
                                                 "input width; 0 = one scale per output channel.")] = 64,
    hqq: Annotated[bool, typer.Option(help="Refine 8/4-bit scales with HQQ in MNN's converter.")] = False,
    verify: Annotated[bool, typer.Option(help="Run the model in MNN (prefill of 48 tokens + 16 cached steps) and "
                                              "judge its logits against the reference model by the shared "
                                              "verifier's bar for the bit width before keeping it.")] = True,
    threads: VerifyThreadsOpt = 1,
    force: ForceOpt = False,
    loader: LoaderOptions = LoaderOptions(),
):
    """MNN for Alibaba's mobile engine: model.mnn (graph with a fixed-capacity KV cache, opset-17 ONNX converted by
    the MNN wheel), a 16-bit embedding file, tokenizer and manifest.json. Never calls MNN's telemetry."""
    from exporters import get as get_exporter
    from exporters.mnn import check_options
    from toolkit.core.outputs import check_destination

    check_options(None, bits, group_size, hqq)
    dest = out_dir or _default_dest(ckpt, f"-mnn-{bits}bit")
    check_destination(dest, force)
    bundle = loader.load(ckpt)
    report = get_exporter("mnn").export(bundle, dest, bits, group_size, hqq, verify, force, threads)
    v = report.verification
    checked = (f"verified in MNN over prefill + {v['decode_steps']} cached steps ({_verified(v)})"
               ) if v else "not verified"
    grid = f", group size {report.group_size or 'per channel'}{', hqq' if report.hqq else ''}" if bits < 16 else ""
    err.print(f"{bits}-bit{grid}: {report.size_bytes / 1e6:.1f} MB, {report.seconds:.1f} s; {checked}")
    out.print(str(dest))


# --- quantize --------------------------------------------------------------------------------------------------
quantize_app = typer.Typer(no_args_is_help=True, help="Quantize weights to INT8 or INT4.")
app.add_typer(quantize_app, name="quantize")

SourceVariantOpt = Annotated[str, typer.Option(help="Variant when SRC is a checkpoint.")]
SourceOpsetOpt = Annotated[int, typer.Option(help="Opset when SRC is a checkpoint.")]
FormatOpt = Annotated[str, typer.Option("--format", help="hf: a quantized checkpoint (Hugging Face folder); onnx: "
                                                          "a quantized ONNX export folder (a checkpoint is exported "
                                                          "first, --variant ort); auto: onnx when SRC is an ONNX "
                                                          "export folder, else hf.")]


def _onnx_source(src: Path, variant: str, opset: int, work: Path, loader: LoaderOptions, threads: int):
    """The folder with model.onnx: an export folder as it is, or a checkpoint exported first into `work`."""
    from runtimes.onnxruntime import MODEL_FILE

    if src.is_dir() and (src / MODEL_FILE).is_file():
        return src
    from exporters.onnx import check_opset, check_variant
    from exporters.onnx import export as export_onnx_folder

    check_opset(opset)
    bundle = loader.load(src)
    check_variant(bundle, variant)
    folder = work / "fp32"
    err.print(f"exporting {src} to ONNX ({variant}, opset {opset}) first")
    export_onnx_folder(bundle, folder, variant, opset, True, False, threads)
    return folder


def _quantize_onnx(kind: str, src: Path, dest: Path | None, force: bool, variant: str, opset: int, threads: int,
                   loader: LoaderOptions, **options) -> None:
    import tempfile
    import time

    from exporters.onnx.quantize import quantize_onnx_folder
    from toolkit.core.outputs import check_destination

    dest = dest or _default_dest(src, f"-onnx-{kind}")
    check_destination(dest, force)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="toolkit-quant-", dir=dest.parent if dest.parent.exists() else None) as tmp:
        folder = _onnx_source(src, variant, opset, Path(tmp), loader, threads)
        report = quantize_onnx_folder(folder, dest, kind, force=force, threads=threads, **options)
    v = report["verification"]
    err.print(f"{kind} ONNX: {report['size_bytes'] / 1e6:.1f} MB (fp32 {report['source_size_bytes'] / 1e6:.1f} MB), "
              f"{report['quantized_matmuls']} of {report['matmuls']} MatMuls quantized, lm_head "
              f"{report['lm_head']}; {time.perf_counter() - t0:.1f} s; verified against the fp32 graph "
              f"({_verified(v)})")
    out.print(str(dest))


@quantize_app.command("int8")
@loader_options
def quantize_int8(
    src: Annotated[Path, typer.Argument(help="A checkpoint, or an ONNX export folder (--format onnx).")],
    out_dir: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder.")] = None,
    fmt: FormatOpt = "auto",
    variant: SourceVariantOpt = "ort",
    opset: SourceOpsetOpt = 20,
    threads: VerifyThreadsOpt = 1,
    force: ForceOpt = False,
    loader: LoaderOptions = LoaderOptions(),
):
    """INT8. hf: weight-only, symmetric per output channel (int8 weights + fp32 scales, quant_method toolkit_int8)
    for every linear layer of the decoder blocks. onnx: ONNX Runtime dynamic quantization (int8 weights per output
    channel, activations quantized per call), every MatMul including the lm_head."""
    if _format(fmt, src) == "onnx":
        _quantize_onnx("int8", src, out_dir, force, variant, opset, threads, loader)
    else:
        _quantize_checkpoint("int8", src, out_dir, force, loader, None, "cpu")


@quantize_app.command("int4")
@loader_options
def quantize_int4(
    src: Annotated[Path, typer.Argument(help="A checkpoint, or an ONNX export folder (--format onnx).")],
    out_dir: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder.")] = None,
    fmt: FormatOpt = "auto",
    method: Annotated[str, typer.Option(help="hf: gptq (calibrated, error-compensating) or rtn "
                                             "(round-to-nearest). onnx: always RTN (MatMulNBits).")] = "gptq",
    group_size: Annotated[Optional[int], typer.Option(help="Weights per scale: 32, 64, 128 or -1 (one per row). "
                                                           "Default: 128 (hf), 32 (onnx).")] = None,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="Symmetric grid (zero point 8) or asymmetric "
                                                           "(min/max per group). hf only.")] = True,
    act_order: Annotated[bool, typer.Option(help="GPTQ: quantize columns in order of decreasing Hessian "
                                                 "diagonal (static groups, so g_idx stays i // group).")] = False,
    calib: Annotated[Optional[Path], typer.Option(help="GPTQ calibration text. Default: the checkpoint's "
                                                       "calib.txt (a sample of its training split).")] = None,
    nsamples: Annotated[int, typer.Option(help="GPTQ: calibration samples (at most).")] = 128,
    seqlen: Annotated[int, typer.Option(help="GPTQ: tokens per calibration sample.")] = 512,
    damp: Annotated[float, typer.Option(help="GPTQ: dampening, as a fraction of the mean Hessian diagonal "
                                             "(raised ×10 and reported if Cholesky fails).")] = 0.01,
    device: Annotated[str, typer.Option(help="GPTQ compute device: auto, cpu or cuda.")] = "auto",
    lm_head_bits: Annotated[int, typer.Option(help="onnx: bits of the lm_head (8 keeps the most sensitive matmul "
                                                   "accurate; 4 is smaller).")] = 8,
    embed_bits: Annotated[int, typer.Option(help="hf: bits of the token embedding (the output head too when tied): "
                                                 "16 keeps it as stored, loadable by transformers/GPTQModel; 8 "
                                                 "stores it int8 per row, half the size, read by this toolkit's "
                                                 "runtimes and exporters only.")] = 16,
    variant: SourceVariantOpt = "ort",
    opset: SourceOpsetOpt = 20,
    threads: VerifyThreadsOpt = 1,
    force: ForceOpt = False,
    loader: LoaderOptions = LoaderOptions(),
):
    """INT4. hf: GPTQ or RTN of every linear layer of the decoder blocks, saved as GPTQ-v1 tensors (qweight,
    qzeros, scales, g_idx; quant_method gptq). onnx: MatMulNBits (symmetric, blockwise round-to-nearest,
    accuracy_level=4: int8 activations in the dot products), lm_head at --lm-head-bits; a GPTQ checkpoint's
    weights go into MatMulNBits as they are."""
    if _format(fmt, src) == "onnx":
        group_size = group_size or 32
        if group_size not in (16, 32, 64, 128, 256):
            raise ToolkitError(f"--group-size {group_size} is not supported by MatMulNBits",
                               "choose 16, 32, 64, 128 or 256")
        if lm_head_bits not in (4, 8):
            raise ToolkitError(f"--lm-head-bits {lm_head_bits} is not supported", "choose 4 or 8")
        _quantize_onnx("int4", src, out_dir, force, variant, opset, threads, loader, group_size=group_size,
                       lm_head_bits=lm_head_bits)
        return
    from quant.checkpoint import Int4Options

    if method not in ("gptq", "rtn"):
        raise ToolkitError(f"unknown --method '{method}'", "use gptq or rtn")
    if seqlen < 1 or nsamples < 1 or not 0 < damp <= 1:
        raise ToolkitError("--seqlen and --nsamples must be positive and --damp in (0, 1]",
                           "the defaults are 512, 128 and 0.01")
    if embed_bits not in (16, 8):
        raise ToolkitError(f"--embed-bits {embed_bits} is not supported", "use 16 (as stored) or 8")
    opts = Int4Options(method=method, group_size=group_size or 128, sym=sym, act_order=act_order, damp=damp,
                       nsamples=nsamples, seqlen=seqlen, calib=calib, embed_bits=embed_bits)
    _quantize_checkpoint("int4", src, out_dir, force, loader, opts, device)


def _format(fmt: str, src: Path) -> str:
    from runtimes.onnxruntime import MODEL_FILE

    if fmt not in ("auto", "hf", "onnx"):
        raise ToolkitError(f"unknown --format '{fmt}'", "use hf, onnx or auto")
    if fmt == "auto":
        return "onnx" if (src / MODEL_FILE).is_file() else "hf"
    return fmt


def _quantize_checkpoint(kind: str, src: Path, dest: Path | None, force: bool, loader: LoaderOptions, opts,
                         device: str) -> None:
    import shutil

    from quant.checkpoint import check_group_size, quantize_checkpoint, refuse_quantized
    from toolkit.app.progress import count_progress
    from toolkit.core.manifest import SourceHash
    from toolkit.core.outputs import atomic_output, check_destination

    suffix = "-int8" if kind == "int8" else f"-{opts.method}4-g{opts.group_size}"
    dest = dest or _default_dest(src, suffix)
    check_destination(dest, force)
    bundle = loader.load(src)
    refuse_quantized(bundle)
    if opts is not None:
        check_group_size(bundle, opts.group_size)
        if opts.method == "gptq":
            from quant.checkpoint import calibration_ids

            calibration_ids(bundle, opts)  # bad calibration text fails before any work
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    what = "layers" if opts is not None and opts.method == "gptq" else "linear layers"
    source_hash = SourceHash(bundle.provenance)
    with atomic_output(dest, force, directory=True) as work:
        with count_progress(err, f"{kind} {what}") as progress:
            try:
                report = quantize_checkpoint(bundle, work, kind, opts, device, progress)
            except FloatingPointError as e:
                raise ToolkitError(f"quantization failed: {e}", "raise --damp or give more calibration text")
        from quant.checkpoint import verify_checkpoint, write_checkpoint_manifest

        report["verification"] = verify_checkpoint(bundle, work, kind)
        base = Path(bundle.provenance.get("path", src))
        for side in ("heldout.txt", "calib.txt"):  # the baseline's texts travel with the quantized model
            file = (base if base.is_dir() else base.parent) / side
            if file.is_file():
                shutil.copy2(file, work / side)
        write_checkpoint_manifest(bundle, work, dest.name, kind, report, source_hash)
    size = sum(f.stat().st_size for f in dest.glob("*.safetensors"))
    extra = ""
    if "calibration" in report:
        c = report["calibration"]
        extra = f", calibrated on {c['samples']} x {c['seqlen']} tokens"
    if report.get("damp_raised"):
        extra += f"; dampening raised for {len(report['damp_raised'])} layers (Cholesky failed)"
    err.print(f"{kind} {report['quantized_linears']} linear layers in {report['seconds']:.1f} s{extra}; "
              f"weights {size / 1e6:.1f} MB; verified ({_verified(report['verification'])})")
    print(dest)


# --- eval-parity -----------------------------------------------------------------------------------------------
@app.command("eval-parity")
@loader_options
def eval_parity(
    ckpt: Annotated[Path, typer.Argument(help="The checkpoint the artifacts came from (the baseline).")],
    artifacts: Annotated[Optional[list[Path]], typer.Argument(help="Exported or quantized artifacts: .gguf files, "
                                                                   "ONNX export folders, checkpoints.")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("-o", "--out", help="Report folder (parity.json, parity.md, "
                                                                        "parity.png). Default: <ckpt>-parity.")] = None,
    text: Annotated[Optional[Path], typer.Option(help="UTF-8 text to score. Default: the checkpoint's "
                                                      "heldout.txt.")] = None,
    ctx: Annotated[int, typer.Option(help="Chunk length; the second half of each chunk is scored "
                                          "(llama-perplexity's default 512; PROTOCOL uses 256).")] = 512,
    device: Annotated[str, typer.Option(help="Baseline device: auto (CUDA fp16 when present, else CPU fp32), "
                                             "cuda, or cpu; artifacts run on it where their runtime can.")] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads for every runtime.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed generations per row (median ± std).")] = 3,
    max_kld: Annotated[Optional[float], typer.Option(help="Gate: exit 1 if a row's mean KLD exceeds this.")] = None,
    max_ppl_delta: Annotated[Optional[float], typer.Option(help="Gate: exit 1 if a row's PPL exceeds the "
                                                                "baseline's by more than this many percent.")] = None,
    with_: Annotated[Optional[str], typer.Option("--with", help="Also rows of the checkpoint quantized in memory by "
                                                                "bitsandbytes: bnb-int8 (LLM.int8, threshold 6.0), "
                                                                "bnb-nf4 (NF4, double quantization); comma-separated."
                                                    )] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
    loader: LoaderOptions = LoaderOptions(),
):
    """Put the baseline and every artifact on the same text: PPL, bits per byte, KLD, same-top-token, RMS Δp,
    prefill/decode speed, size, peak memory. Each artifact runs in a fresh process; a row that fails is reported and
    the others still run. Exit 1 when a row failed or a gate is breached."""
    from toolkit.app.parity import ParityOptions, breaches, evaluate
    from toolkit.app.parity import report as parity_report
    from toolkit.app.progress import count_progress
    from toolkit.core.errors import VerificationError
    from toolkit.core.outputs import atomic_output, check_destination

    if threads <= 0 or repeats <= 0:
        raise ToolkitError("--threads and --repeats must be positive", "pass e.g. --threads 1 --repeats 3")
    from runtimes import RUNTIMES
    from toolkit.app.parity import WITH_RUNTIMES

    with_runtimes = []
    for name in [n.strip() for n in (with_ or "").split(",") if n.strip()]:
        if name not in WITH_RUNTIMES:
            raise ToolkitError(f"unknown --with '{name}'", f"choose from: {', '.join(WITH_RUNTIMES)}")
        if WITH_RUNTIMES[name] not in RUNTIMES:
            raise ToolkitError(f"--with {name} needs bitsandbytes, which is not installed",
                               "pip install 'edge-toolkit[quant]' (bitsandbytes==0.50.2)")
        with_runtimes.append(WITH_RUNTIMES[name])
    dest = out_dir or _default_dest(ckpt, "-parity")
    check_destination(dest, force)
    overrides = loader.overrides()
    opts = ParityOptions(ckpt=ckpt, artifacts=list(artifacts or []), text=text, ctx=ctx, device=device,
                         threads=threads, repeats=repeats, max_kld=max_kld, max_ppl_delta=max_ppl_delta,
                         overrides=overrides, with_runtimes=with_runtimes)
    with count_progress(err, "baseline chunks") as progress:
        result = evaluate(opts, progress=progress, log=lambda line: err.print(line))
    with atomic_output(dest, force, directory=True) as work:
        parity_report.write(result, work)
    parity_report.print_table(result, out)
    out.print(f"report: {dest / 'parity.md'} (+ parity.json, parity.png)")
    bad = breaches(result)
    if bad:
        raise VerificationError("; ".join(bad), f"see {dest / 'parity.md'}")


# --- quickstart ------------------------------------------------------------------------------------------------
@app.command()
def quickstart(
    out_dir: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("artifacts/quickstart"),
    steps: Annotated[Optional[int], typer.Option(help="Training steps (default 400: about 2 minutes on 2 "
                                                      "CPUs).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for training and verification (measurements use "
                                              "1).")] = 2,
    repeats: Annotated[int, typer.Option(help="Timed generations per parity row.")] = 3,
    force: ForceOpt = False,
):
    """Everything on the embedded corpus: train a small model, export GGUF f16/q8_0/q4_k_m (+ Ollama Modelfiles)
    and ONNX fp32/int8/int4, each verified, then eval-parity of all of them on the held-out split."""
    from toolkit.app import quickstart as qs
    from toolkit.app.parity import breaches
    from toolkit.app.parity import report as parity_report
    from toolkit.app.progress import step_progress
    from toolkit.core.outputs import check_destination

    check_destination(out_dir, force)
    with step_progress(err, steps or qs.MODEL["steps"]) as progress:
        result = qs.run(out_dir, force, threads, steps, repeats, log=lambda line: err.print(line),
                        train_progress=progress)
    parity_report.print_table(result, out)
    err.print(f"done in {result['quickstart_seconds'] / 60:.1f} min. Report: {out_dir / 'parity' / 'parity.md'}; "
              f"Ollama: ollama create <name> -f {out_dir / 'model-q4_k_m.Modelfile'}")
    bad = breaches(result)
    if bad:
        from toolkit.core.errors import VerificationError

        raise VerificationError("; ".join(bad), f"see {out_dir / 'parity' / 'parity.md'}")
    out.print(str(out_dir))


# --- modelfile -----------------------------------------------------------------------------------------------
modelfile_app = typer.Typer(no_args_is_help=True, help="Ollama Modelfiles.")
app.add_typer(modelfile_app, name="modelfile")


@modelfile_app.command("validate")
def modelfile_validate(path: Annotated[Path, typer.Argument(help="The Modelfile to check.")]):
    """Check a Modelfile by Ollama's rules: instructions, quoting, parameter names and types, roles, that a FROM
    file exists (Ollama would silently read a missing one as a registry model name), and that the TEMPLATE parses
    and renders in Go's text/template as Ollama runs it, identically to the FROM GGUF's own chat template."""
    from exporters.gguf.modelfile import validate

    report = validate(path)
    for note in report.notes:
        err.print(f"[dim]{note}[/dim]")
    for warning in report.warnings:
        err.print(f"[yellow]warning[/yellow] {warning}")
    out.print(f"{path}: valid")


# --- entry point -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    import signal

    # a process started in the background by a non-interactive shell inherits SIGINT as ignored, and Python then
    # never raises KeyboardInterrupt: Ctrl-C / kill -INT must still stop work cleanly (exit 130, resumable state)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    args = list(sys.argv[1:] if argv is None else argv)
    Flags.debug = "--debug" in args
    Flags.verbose = "--verbose" in args
    args = [a for a in args if a not in ("--debug", "--verbose")]
    code = 0
    try:
        result = app(args=args, prog_name="toolkit", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except ToolkitError as e:
        if Flags.debug:
            import traceback

            traceback.print_exc()
        sys.stdout.flush()
        print(e.line(), file=sys.stderr)
        code = e.exit_code
    except click_exceptions.UsageError as e:
        if type(e).__name__ == "NoArgsIsHelpError":  # bare `toolkit`: the help is the answer
            print(e.format_message())
            sys.exit(0)
        command = e.ctx.command_path if e.ctx else "toolkit"
        print(f"error: {e.format_message()} (hint: see '{command} --help')", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted (hint: outputs are written only on success; rerun the command)", file=sys.stderr)
        code = 130
    except Exception as e:  # a bug: say so on one line, traceback with --debug
        if type(e).__name__ == "Exit":  # click's Exit (--help and friends); typer's vendored click lacks the name
            sys.exit(getattr(e, "exit_code", 0))
        if type(e).__name__ == "Abort":
            print("error: interrupted (hint: outputs are written only on success; rerun the command)",
                  file=sys.stderr)
            sys.exit(130)
        if Flags.debug:
            raise
        print(f"error: internal error: {type(e).__name__}: {e} (hint: rerun with --debug for the traceback and "
              "report it)", file=sys.stderr)
        code = 1
    sys.exit(code)

"""`toolkit`: the command line. Thin: parse, call, print.

Contract for every command (DESIGN.md): inputs positional, outputs `-o/--out`; an existing output is refused unless
`--force`; exit 0 done, 1 a verification failed, 2 bad input with `error: <what> (hint: <how>)` as the last stderr
line and no traceback unless `--debug`. `--debug` and `--verbose` are accepted anywhere on the line.
"""
from __future__ import annotations

import errno
import json
import os
import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.20 vendors click; its exceptions live there
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer uses click itself
    from click import exceptions as click_exceptions

from toolkit.app.console import Flags, err, out
from toolkit.app.loader_options import LoaderOptions, loader_options
from toolkit.core.errors import ToolkitError
from toolkit.core.targets import beside

app = typer.Typer(name="toolkit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Take small language models to the edge: train, convert, quantize, export, and prove parity.")

ForceOpt = Annotated[bool, typer.Option(help="Replace an existing output.")]


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
                        num_kv_heads=kv_heads, intermediate_size=ffn,
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
    from toolkit.app.info import describe

    report, rows = describe(loader.load(ckpt), ckpt)
    if as_json:
        out.print_json(json.dumps(report))
        return
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
class ConvertTo(str, Enum):
    """`convert --to`: the folder layouts a checkpoint converts to (exports to runtimes' formats: `toolkit export`)."""
    hf = "hf"


@app.command()
@loader_options
def convert(
    ckpt: Annotated[Path, typer.Argument(help="Checkpoint to convert.")],
    to: Annotated[ConvertTo, typer.Option("--to", help="Target format: hf (a folder transformers loads); for "
                                                     "runtimes' formats see `toolkit export`.")] = "hf",
    out_dir: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output folder. Default: <ckpt>-hf/.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32, float16 or bfloat16 (default: as stored).")] = None,
    force: ForceOpt = False,
    loader: LoaderOptions = LoaderOptions(),
):
    """Save any checkpoint as a Hugging Face folder (config.json, safetensors, tokenizer) for transformers."""
    import torch

    from toolkit.checkpoints.hf_writer import save_hf
    from toolkit.core.outputs import atomic_output, check_destination

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


# --- export, quantize: generated from the targets exporters/ and quant/ declare -------------------------------
def _target_group(command: str, help: str) -> typer.Typer:
    import exporters
    import quant
    from toolkit.app.target_commands import add_commands

    group = typer.Typer(no_args_is_help=True, help=help)
    add_commands(group, [t for t in exporters.registry() + quant.registry() if t.command == command])
    app.add_typer(group, name=command)
    return group


export_app = _target_group("export", "Export a checkpoint to a runtime's format, verified against the reference "
                                     "model before it is kept.")
quantize_app = _target_group("quantize", "Quantize weights to INT8 or INT4.")


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
    dtype: Annotated[str, typer.Option(help="Baseline precision: auto (float16 on CUDA, float32 on the CPU), "
                                            "float32, bfloat16 or float16. On a CPU (measured: AMD EPYC, no AMX) "
                                            "bfloat16 scores twice as fast as float32 but is itself as far from "
                                            "float32 as a q8_0 file (KLD 7.8e-4 on SmolLM2-135M); the report gives "
                                            "that distance (the float32 model scored against it on 4 chunks)."
                                       )] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads of the timed generations (1: what these speed figures "
                                              "are quoted at).")] = 1,
    score_threads: Annotated[Optional[int], typer.Option(help="CPU threads for scoring the text (default: every "
                                                              "core).")] = None,
    repeats: Annotated[int, typer.Option(help="Timing rounds: each round times every row once, each in a fresh "
                                              "process, interleaved (median ± std, and each row's per-round ratio "
                                              "to the baseline).")] = 3,
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
    from toolkit.app.parity import ParityOptions, breaches, evaluate, with_runtimes
    from toolkit.app.parity import report as parity_report
    from toolkit.app.progress import count_progress
    from toolkit.core.errors import VerificationError
    from toolkit.core.outputs import atomic_output, check_destination

    if threads <= 0 or repeats <= 0 or (score_threads is not None and score_threads <= 0):
        raise ToolkitError("--threads, --score-threads and --repeats must be positive",
                           "pass e.g. --threads 1 --repeats 3")
    extra_rows = with_runtimes(with_)
    dest = out_dir or beside(ckpt, "-parity")
    check_destination(dest, force)
    overrides = loader.overrides()
    opts = ParityOptions(ckpt=ckpt, artifacts=list(artifacts or []), text=text, ctx=ctx, device=device,
                         dtype=dtype, threads=threads, repeats=repeats, max_kld=max_kld, max_ppl_delta=max_ppl_delta,
                         overrides=overrides, with_runtimes=extra_rows, score_threads=score_threads)
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
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # a full disk is the user's to fix, not a bug
            where = f" writing {e.filename}" if e.filename else ""
            print(f"error: no space left on the device{where} (hint: free disk space, or write to another disk with "
                  "-o; nothing was kept)", file=sys.stderr)
            sys.exit(2)
        print(f"error: internal error: {type(e).__name__}: {e} (hint: rerun with --debug for the traceback and "
              "report it)", file=sys.stderr)
        code = 1
    sys.exit(code)

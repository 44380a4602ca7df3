"""`toolkit train`: pretrain a MiniMind-style model from scratch.

Text: `--text FILE` (split at a character offset: the last `heldout_frac` is held out) and/or the embedded corpus
(training only when a file is given, as in PROTOCOL.md). A byte-level BPE tokenizer is trained on the training split
unless one is given. AdamW, linear warm-up + cosine decay, gradient clipping and accumulation, AMP on CUDA, a masked
loss that is 0 (not NaN) on an all-padding batch, keep-best on held-out perplexity (llama-perplexity scoring),
periodic resumable state. Under `torchrun --nproc_per_node N` it trains with PyTorch DDP (gloo on CPU, nccl on CUDA).

Output (a Hugging Face directory): config.json, model.safetensors, tokenizer files, heldout.txt, calib.txt,
train_state.pt (for --resume), train_log.jsonl, training.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.app.corpus import default_corpus
from toolkit.checkpoints.hf_writer import save_hf
from toolkit.core.arch import NANOCHAT_EPS, ArchConfig
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import Interrupted, ToolkitError
from toolkit.core.model import Decoder, init_weights
from toolkit.core.outputs import atomic_output, check_destination
from toolkit.core.perplexity import perplexity
from toolkit.core.tokenizer import Tokenizer

CALIB_CHARS = 256 * 1024  # enough for GPTQ's 128 samples x 512 tokens
CALIB_PIECES = 64


@dataclass
class TrainOptions:
    out: str
    texts: list[str] = field(default_factory=list)
    with_default_corpus: bool = False
    heldout_frac: float = 0.1
    tokenizer: str | None = None
    vocab_size: int = 4096
    arch: str = "llama"
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int | None = None  # None: the family's default (FFN_DEFAULT)
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-5
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 400
    lr: float = 2e-3
    min_lr: float = 0.0
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    eval_ctx: int | None = None  # default: seq_len
    seed: int = 0
    device: str = "auto"
    resume: str | None = None
    force: bool = False
    threads: int | None = None


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token NLL over labels != ignore_index; exactly 0 (with a gradient) when nothing is scored."""
    mask = labels != ignore_index
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1),
                          reduction="none")
    return (nll * mask.reshape(-1)).sum() / mask.sum().clamp(min=1)


def lr_at(step: int, opts: TrainOptions) -> float:
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    progress = min(1.0, (step - opts.warmup) / max(1, opts.steps - opts.warmup - 1))  # 1.0 on the last step
    return opts.min_lr + 0.5 * (opts.lr - opts.min_lr) * (1 + math.cos(math.pi * progress))


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ToolkitError(f"text file {path} does not exist", "check the --text path")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ToolkitError(f"{path} is not UTF-8 text (byte {e.start})", "convert it with iconv -t utf-8") from None


def split_texts(opts: TrainOptions) -> tuple[str, str]:
    """(training text, held-out text): split the given text at a character offset; the corpus only trains."""
    if not 0 < opts.heldout_frac < 1:
        raise ToolkitError(f"--heldout-frac must be between 0 and 1, got {opts.heldout_frac}", "use e.g. 0.1")
    given = "\n\n".join(read_text(t) for t in opts.texts) if opts.texts else ""
    if opts.texts and not given.strip():
        raise ToolkitError(f"{', '.join(opts.texts)}: the corpus is empty", "give a file with text in it")
    if not given:
        given = default_corpus()
        extra = ""
    else:
        extra = default_corpus() if opts.with_default_corpus else ""
    cut = int((1 - opts.heldout_frac) * len(given))
    train, held = given[:cut], given[cut:]
    if extra:
        train = extra + "\n\n" + train
    if not train.strip() or not held.strip():
        raise ToolkitError("the corpus is too small to split into training and held-out text",
                           "give more text or change --heldout-frac")
    return train, held


def calibration_sample(train: str) -> str:
    """Evenly spaced pieces of the training split (never the held-out text), for quantizers' calibration."""
    if len(train) <= CALIB_CHARS:
        return train
    piece = CALIB_CHARS // CALIB_PIECES
    stride = (len(train) - piece) // (CALIB_PIECES - 1)
    return "\n\n".join(train[i * stride:i * stride + piece] for i in range(CALIB_PIECES))


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist

            if device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def weights_sha256(state: dict[str, torch.Tensor]) -> str:
    """A digest of a model's weights: each tensor's name and its bytes (as stored, contiguous, on the CPU), in name
    order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("--device cuda but no CUDA device is visible", "use --device cpu or install a CUDA torch")
    if name not in ("cpu", "cuda"):
        raise ToolkitError(f"unknown device '{name}'", "use --device cpu, cuda or auto")
    return torch.device(name)


TRAINABLE = ("llama", "qwen3", "nanochat")
# the MLP width when --ffn is not given: MiniMind's 768 at hidden 256; NanoChat's 4 x hidden
FFN_DEFAULT = {"llama": lambda hidden: 768, "qwen3": lambda hidden: 768, "nanochat": lambda hidden: 4 * hidden}


def build_config(opts: TrainOptions, tokenizer: Tokenizer) -> ArchConfig:
    if opts.arch not in TRAINABLE:
        raise ToolkitError(f"toolkit train builds {', '.join(TRAINABLE)} models, not '{opts.arch}'",
                           "use --arch " + "|".join(TRAINABLE))
    if opts.num_heads <= 0 or opts.hidden_size % opts.num_heads:
        raise ToolkitError(f"{opts.num_heads} heads do not divide hidden size {opts.hidden_size}",
                           "choose --heads that divides --hidden")
    cfg = ArchConfig(family=opts.arch, vocab_size=tokenizer.vocab_size, hidden_size=opts.hidden_size,
                     num_layers=opts.num_layers, num_heads=opts.num_heads, num_kv_heads=opts.num_kv_heads,
                     head_dim=opts.hidden_size // opts.num_heads, intermediate_size=opts.intermediate_size,
                     rms_norm_eps=opts.rms_norm_eps, rope_theta=opts.rope_theta,
                     max_position_embeddings=max(2048, opts.seq_len), tie_word_embeddings=True,
                     bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    if opts.arch == "nanochat":  # NanoChat era A as released: untied head, RoPE base 1e4, softcap 15, fp32 eps
        cfg.tie_word_embeddings = False
        cfg.rope_theta, cfg.logit_softcap, cfg.rms_norm_eps = 1e4, 15.0, NANOCHAT_EPS
    return cfg.validate()


def heldout_perplexity(model: Decoder, tokens: list[int], ctx: int, device: torch.device, bos: int | None,
                       batch: int = 8) -> float:
    def logits_fn(group: list[list[int]]) -> np.ndarray:
        with torch.no_grad(), _autocast(device):
            out = model(torch.tensor(group, device=device))
        return out.float().cpu().numpy()

    was_training = model.training
    model.eval()
    try:
        return perplexity(logits_fn, tokens, ctx, bos, batch_size=batch).ppl
    finally:
        model.train(was_training)


def _autocast(device: torch.device):
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", enabled=False)


RECIPE = ("texts", "with_default_corpus", "heldout_frac", "tokenizer", "vocab_size", "arch", "hidden_size",
          "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "rope_theta", "rms_norm_eps", "seq_len",
          "batch_size", "grad_accum", "lr", "min_lr", "warmup", "weight_decay", "beta1", "beta2", "grad_clip",
          "eval_ctx", "seed")  # what --resume takes from the run; --steps, intervals, device and output stay new


def validate_options(opts: TrainOptions) -> None:
    if opts.intermediate_size is None:  # an unknown --arch is refused by build_config, with the list
        opts.intermediate_size = FFN_DEFAULT.get(opts.arch, FFN_DEFAULT["llama"])(opts.hidden_size)
    positive = {"steps": opts.steps, "batch-size": opts.batch_size, "grad-accum": opts.grad_accum,
                "eval-every": opts.eval_every, "save-every": opts.save_every, "layers": opts.num_layers,
                "hidden": opts.hidden_size, "heads": opts.num_heads, "kv-heads": opts.num_kv_heads,
                "ffn": opts.intermediate_size, "lr": opts.lr}
    if opts.threads is not None:
        positive["threads"] = opts.threads
    for name, value in positive.items():
        if value <= 0:
            raise ToolkitError(f"--{name} must be positive, got {value}", "pass a positive number")
    for name, value in {"warmup": opts.warmup, "min-lr": opts.min_lr, "weight-decay": opts.weight_decay,
                        "grad-clip": opts.grad_clip}.items():
        if value < 0:
            raise ToolkitError(f"--{name} must not be negative, got {value}", "pass 0 or more")
    ctx = opts.eval_ctx or opts.seq_len
    if ctx < 4 or ctx % 2:
        raise ToolkitError(f"--seq-len {ctx} must be an even number of at least 4 (held-out chunks are scored "
                           "on their second half)", "use e.g. --seq-len 256")


def _load_resume(path: str) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "train_state.pt"
    if not p.is_file():
        raise ToolkitError(f"no training state at {path}", "pass the folder of an earlier `toolkit train` run "
                                                            "(it holds train_state.pt)")
    try:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling/format problem is the user's file
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ToolkitError(f"cannot read training state {p}: {reason}",
                           "the file is damaged; start without --resume") from None
    needed = {"model", "optimizer", "step", "best_ppl", "best_step", "log", "options", "tokenizer_json"}
    if not isinstance(state, dict) or not needed <= set(state):
        raise ToolkitError(f"{p} is not a `toolkit train` state file", "pass the train_state.pt of an earlier run")
    return state


ProgressFn = Callable[[dict[str, Any]], None]


def train(opts: TrainOptions, progress: ProgressFn | None = None) -> dict[str, Any]:
    device = pick_device(opts.device)
    validate_options(opts)
    dist = Distributed(device)
    device = dist.device
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out = Path(opts.out)
    if dist.main:
        check_destination(out, opts.force)
    state = _load_resume(opts.resume) if opts.resume else None
    if state is not None:  # the run's own recipe (model, data, optimizer); the step budget may grow
        for key in RECIPE:
            if key in state["options"]:
                setattr(opts, key, state["options"][key])
        if opts.steps <= state["step"]:
            raise ToolkitError(f"the run already did {state['step']} steps", f"pass --steps above {state['step']}")

    train_text, held_text = split_texts(opts)
    tok_json = None
    if dist.main:
        if state is not None:
            tok_json = state["tokenizer_json"]
        elif opts.tokenizer:
            tok_json = Tokenizer.from_dir(opts.tokenizer)
        else:
            tok_json = Tokenizer.train_bpe(_pieces(train_text), opts.vocab_size)
        tok_json = (tok_json.tok.to_str(), tok_json.config) if isinstance(tok_json, Tokenizer) else tok_json
    tok_str, tok_cfg = dist.broadcast(tok_json)
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = Tokenizer(HFTokenizer.from_str(tok_str), tok_cfg)
    train_ids = np.asarray(tokenizer.encode(train_text, add_bos=False), dtype=np.int64)
    held_ids = tokenizer.encode(held_text, add_bos=False)
    ctx = opts.eval_ctx or opts.seq_len
    if len(held_ids) < ctx:
        raise ToolkitError(f"the held-out split has {len(held_ids)} tokens, fewer than one {ctx}-token chunk",
                           "give more text, raise --heldout-frac or lower --seq-len")
    if len(train_ids) <= opts.seq_len + 1:
        raise ToolkitError(f"the training split has only {len(train_ids)} tokens", "give more text")

    cfg = build_config(opts, tokenizer)
    torch.manual_seed(opts.seed)
    model = init_weights(Decoder(cfg), seed=opts.seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": opts.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=opts.lr,
                              betas=(opts.beta1, opts.beta2), fused=device.type == "cuda")
    start, best_ppl, best_step, log = 0, float("inf"), -1, []
    best_weights: dict[str, torch.Tensor] | None = None
    if state is not None:
        model.load_state_dict(state["model"])
        optim.load_state_dict(state["optimizer"])
        start, best_ppl, best_step, log = state["step"], state["best_ppl"], state["best_step"], state["log"]
        best_weights = state.get("best_model")
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    ddp_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    bos = tokenizer.bos_id if tokenizer.add_bos else None
    tokens_per_step = opts.batch_size * opts.seq_len * opts.grad_accum * dist.world
    t0, tokens_done = time.perf_counter(), 0
    summary: dict[str, Any] = {}
    # the resumable state lives beside the destination, not in the partial folder, so that a crash or Ctrl-C
    # (which removes the partial) leaves something to --resume from; on success it moves into the output
    state_file = out.with_name(out.name + ".train_state.pt")
    try:
        with (atomic_output(out, opts.force, directory=True) if dist.main else _nullcontext(None)) as work:
            for step in range(start, opts.steps):
                lr = lr_at(step, opts)
                for group in optim.param_groups:
                    group["lr"] = lr
                # one global batch per step whatever the world size: rank r's micro-batch m is row m * world + r,
                # so N ranks train on what one process with N times the accumulation would (tests compare them)
                rng = np.random.default_rng([opts.seed, step, 0])
                rows = rng.integers(0, len(train_ids) - opts.seq_len - 1,
                                    size=(opts.grad_accum * dist.world, opts.batch_size))
                loss_sum = 0.0
                for micro in range(opts.grad_accum):
                    starts = rows[micro * dist.world + dist.rank]
                    window = np.stack([train_ids[s:s + opts.seq_len + 1] for s in starts])
                    batch = torch.from_numpy(window).to(device)
                    sync = micro == opts.grad_accum - 1 or dist.world == 1
                    ctx_mgr = ddp_model.no_sync() if not sync else _nullcontext(None)
                    with ctx_mgr, _autocast(device):
                        logits = ddp_model(batch[:, :-1])
                        loss = masked_lm_loss(logits, batch[:, 1:]) / opts.grad_accum
                    scaler.scale(loss).backward()
                    loss_sum += loss.item()
                scaler.unscale_(optim)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip).item()
                scaler.step(optim)
                scaler.update()
                optim.zero_grad(set_to_none=True)
                tokens_done += tokens_per_step
                loss_sum = dist.mean(loss_sum)  # the global batch's loss, as one process would log it
                record: dict[str, Any] = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
                                          "tok_per_s": tokens_done / (time.perf_counter() - t0)}
                last = step + 1 == opts.steps
                if dist.main and ((step + 1) % opts.eval_every == 0 or last):
                    ppl = heldout_perplexity(model, held_ids, ctx, device, bos)
                    record["heldout_ppl"] = ppl
                    if ppl < best_ppl:  # keep-best: the output's weights are the best evaluated ones
                        best_ppl, best_step = ppl, step + 1
                        best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                log.append(record)
                if dist.main and ((step + 1) % opts.save_every == 0 or last):
                    _save_state(state_file, model, optim, opts, step + 1, best_ppl, best_step, log, best_weights,
                                    tokenizer)
                if progress and dist.main:
                    progress(record)
                dist.barrier() if (step + 1) % opts.eval_every == 0 else None
            # DDP keeps the ranks' weights equal; the run proves it, and refuses to save if they drifted apart
            rank_digests = dist.gather(weights_sha256(model.state_dict()))
            if len(set(rank_digests)) > 1:
                raise ToolkitError(f"the {dist.world} ranks ended with different weights ({rank_digests})",
                                   "report it with the command line: nothing was saved")
            if dist.main:
                if best_weights is None:  # resumed at the end: nothing evaluated in this run
                    best_weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                weights = {k: v for k, v in best_weights.items() if k in cfg.expected_shapes()}
                bundle = ModelBundle.from_tensors(cfg, weights, tokenizer, {"format": "toolkit-train"})
                save_hf(bundle, work)
                (work / "heldout.txt").write_text(held_text, encoding="utf-8")
                (work / "calib.txt").write_text(calibration_sample(train_text), encoding="utf-8")
                with open(work / "train_log.jsonl", "w") as f:
                    for rec in log:
                        f.write(json.dumps(rec) + "\n")
                first_ppl = next((r["heldout_ppl"] for r in log if "heldout_ppl" in r), None)
                summary = {"best_heldout_ppl": best_ppl, "best_step": best_step, "first_heldout_ppl": first_ppl,
                           "steps": opts.steps, "parameters": cfg.num_parameters(), "train_tokens": int(len(train_ids)),
                           "heldout_tokens": len(held_ids), "world_size": dist.world,
                           "rank_weights_sha256": rank_digests, "device": str(device),
                           "seconds": time.perf_counter() - t0, "options": asdict(opts)}
                (work / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
                os.replace(state_file, work / "train_state.pt")
    except KeyboardInterrupt:
        if dist.main and state_file.exists():
            raise Interrupted("training interrupted", f"continue with --resume {state_file}") from None
        raise
    dist.barrier()
    dist.close()
    return summary


def _save_state(file: Path, model, optim, opts, step, best_ppl, best_step, log, best_weights, tokenizer) -> None:
    state = {"model": model.state_dict(), "optimizer": optim.state_dict(), "step": step, "best_ppl": best_ppl,
             "best_step": best_step, "log": log, "options": asdict(opts), "best_model": best_weights,
             "tokenizer_json": (tokenizer.tok.to_str(), tokenizer.config)}
    tmp = file.with_name(file.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, file)


def _pieces(text: str, size: int = 1 << 16):
    for i in range(0, len(text), size):
        yield text[i:i + size]


class _nullcontext:
    def __init__(self, value):
        self.value = value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return False

"""`toolkit quantize int8|int4 CKPT --format hf` (declared in quant/targets.py): quantized checkpoints as Hugging
Face folders.

What is quantized: every linear layer of the decoder blocks (attention q/k/v/o, MLP). The token embedding and the
lm_head keep their dtype, as GPTQ checkpoints and bitsandbytes do (the head shows quantization error most, the
embedding is a lookup) -- unless `--embed-bits 8` asks for the embedding in int8 (below).

- int8 (`quant_method: toolkit_int8`, this project's format): `P.weight` int8 [out, in] and `P.weight_scale`
  fp32 [out]; weight = weight_scale[:, None] * weight. Symmetric per output channel, scale = max|w| / 127.
- int4 (`quant_method: gptq`, GPTQ-v1 tensors, see toolkit/core/gptq_format.py): round-to-nearest or GPTQ over
  calibration text, run layer by layer through the reference model (each layer sees the outputs of the already
  quantized layers before it).
- int4 with `--embed-bits 8`: also `model.embed_tokens.weight` int8 [vocab, hidden] and
  `model.embed_tokens.weight_scale` fp32 [vocab] (this project's int8 layout, per row), marked by
  `"toolkit_embed_bits": 8` in quantization_config. With tied embeddings the head is that same matrix. On a small
  model the embedding is a large share of the file (mm26: 6.6 of 18.5 MB at 16 bits); transformers and GPTQModel
  expect a float embedding, so such a folder is for this toolkit's runtimes and exporters.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from quant.gptq import Hessian, gptq
from quant.targets import Int4Options
from toolkit.core import gptq_format
from toolkit.core.bundle import ModelBundle
from toolkit.core.errors import ToolkitError
from toolkit.core.grid import Grid, dequantize_groups, rtn
from toolkit.core.quantized import EMBED, INT8_METHOD
from toolkit.core.targets import Outcome, RunContext

MIN_CALIB_TOKENS = 16


def quantized_linears(bundle: ModelBundle) -> list[str]:
    """Weights of the decoder blocks' linear layers, in execution order."""
    cfg = bundle.config
    if cfg.fam.moe:
        raise ToolkitError("quantizing mixture-of-experts checkpoints is not supported yet",
                           "quantize a dense model, or export the MoE and use `toolkit quantize int4 --format onnx`")
    names = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn = [p + f"self_attn.{t}_proj.weight" for t in ("q", "k", "v", "o")]
        mlp = ([p + "mlp.fc1.weight", p + "mlp.fc2.weight"] if cfg.fam.mlp == "relu2" else
               [p + f"mlp.{t}_proj.weight" for t in ("gate", "up", "down")])
        names += attn + mlp
    return names


def refuse_quantized(bundle: ModelBundle) -> None:
    q = bundle.provenance.get("quantization")
    if q:
        raise ToolkitError(f"{bundle.provenance.get('path')} is already quantized ({q.get('quant_method')})",
                           "quantize the original full-precision checkpoint")


def check_group_size(bundle: ModelBundle, group_size: int) -> None:
    if group_size == -1:
        return
    if group_size <= 0 or group_size % 8:
        raise ToolkitError(f"--group-size {group_size} is not a positive multiple of 8", "use 32, 64, 128 or -1")
    for name in quantized_linears(bundle):
        width = bundle.tensors[name].shape[1]
        if width % group_size:
            raise ToolkitError(f"--group-size {group_size} does not divide the input width {width} of {name}",
                               "choose a group size that divides every layer's input width, or -1 (per row)")


def check_target(opts: Int4Options) -> None:
    """--target names a grid, and the options that shape GPTQ-v1 groups do not contradict it."""
    from quant.targets import GGUF_TARGETS

    known = ["gptq-v1", *(f"gguf:{t}" for t in GGUF_TARGETS)]
    if opts.target not in known:
        raise ToolkitError(f"unknown --target '{opts.target}'", f"use one of: {', '.join(known)}")
    if opts.target == "gptq-v1":
        return
    ftype = opts.target.split(":", 1)[1]
    block = GGUF_TARGETS[ftype]
    if opts.group_size not in (Int4Options.group_size, block):
        fits = [f"gguf:{t}" for t, b in GGUF_TARGETS.items() if b == opts.group_size]
        raise ToolkitError(
            f"{opts.target} stores one scale per {block} weights (llama.cpp's blocks), so --group-size "
            f"{opts.group_size} cannot map to it",
            f"leave --group-size out or pass --group-size {block}"
            + (f"; groups of {opts.group_size} map to {', '.join(fits)}" if fits else
               f"; groups of {opts.group_size} map to --target gptq-v1 (ONNX MatMulNBits, MNN --group-size "
               f"{opts.group_size})"))
    if opts.embed_bits != 16:
        raise ToolkitError(f"--embed-bits {opts.embed_bits} does not apply to {opts.target}",
                           "the embedding gets llama.cpp's type for the file type; leave --embed-bits out")


def calibration_ids(bundle: ModelBundle, opts: Int4Options) -> torch.Tensor:
    """[n, seqlen] token ids of the options' calibration text (toolkit/core/calibration.py)."""
    from toolkit.core import calibration

    return calibration.calibration_ids(bundle, opts.calib, opts.nsamples, opts.seqlen)


def _int8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    return {"weight": torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8), "weight_scale": scale}


def _rtn4(w: torch.Tensor, grid: Grid) -> dict[str, torch.Tensor]:
    codes, scales, zeros = rtn(w, grid)
    return gptq_format.pack(codes, scales, zeros, grid.group_size)


def _gptq_layers(bundle: ModelBundle, opts: Int4Options, device: str, progress: Callable[[int, int], None],
                 report: dict, solve_set: Callable, solve_head: Callable | None = None
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """GPTQ over the decoder blocks, one block at a time; returns the stored tensors per weight name.
    `solve_set(mods, H)` quantizes the linear layers sharing one input (name, module pairs) given their Hessian and
    returns per layer (name, module, dequantized weight, stored tensors). `solve_head(H)`, if given, gets the Hessian
    of the head's input (the final norm of the quantized blocks' output) and returns {name: stored tensors}."""
    from toolkit.core.model import build_model

    ids = calibration_ids(bundle, opts).to(device)
    report["calibration"] = {"samples": ids.shape[0], "seqlen": ids.shape[1], "tokens": ids.numel()}
    model = build_model(bundle, torch.float32, device)
    packed: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
        if model.model.embed_norm:
            x = model.model.norm(x)
        positions = torch.arange(ids.shape[1], device=device).expand(ids.shape[0], -1)
        cos, sin = model.rope(positions, x.dtype)
        layers = model.model.layers
        for i, layer in enumerate(layers):
            sets = _shared_input_sets(layer, f"model.layers.{i}.")
            hessians = [Hessian(mods[0][1].in_features, device) for mods in sets]
            hooks = [mods[0][1].register_forward_hook(lambda mod, inp, out, h=h: h.add(inp[0]))
                     for mods, h in zip(sets, hessians)]
            for b in range(x.shape[0]):  # one sample at a time bounds the activation memory
                layer(x[b:b + 1], cos[b:b + 1], sin[b:b + 1], None, None, i)
            for h in hooks:
                h.remove()
            for mods, hessian in zip(sets, hessians):
                for name, mod, weight, stored in solve_set(mods, hessian.H):
                    mod.weight.data = weight.to(mod.weight.dtype)
                    packed[name] = stored
            x = torch.cat([layer(x[b:b + 1], cos[b:b + 1], sin[b:b + 1], None, None, i) for b in range(x.shape[0])])
            progress(i + 1, len(layers))
        if solve_head is not None:
            head_in = Hessian(x.shape[-1], device)
            for b in range(x.shape[0]):
                head_in.add(model.model.norm(x[b:b + 1]))
            packed.update(solve_head(head_in.H))
    return packed


def _v1_solver(opts: Int4Options, report: dict) -> Callable:
    """GPTQ-v1 groups: the layers sharing an input solved as one stacked matrix (rows are independent)."""
    grid = Grid(4, opts.group_size, opts.sym)

    def solve_set(mods, H):
        stacked = torch.cat([m.weight.data for _, m in mods])
        res = gptq(stacked, H, grid, opts.damp, opts.act_order)
        if not torch.isfinite(res.codes).all() or not torch.isfinite(res.scales).all():
            raise FloatingPointError(f"GPTQ produced non-finite values for {mods[0][0]}")
        if res.retries:
            report.setdefault("damp_raised", {})[mods[0][0]] = res.damp
        in_f = stacked.shape[1]
        g_idx = torch.arange(in_f, device=stacked.device) // grid.width(in_f)
        out, row = [], 0
        for name, mod in mods:
            rows = slice(row, row + mod.out_features)
            row += mod.out_features
            codes, scales, zeros = res.codes[rows], res.scales[:, rows], res.zeros[:, rows]
            out.append((name, mod, dequantize_groups(codes, scales, zeros, g_idx),
                        gptq_format.pack(codes.cpu(), scales.cpu(), zeros.cpu(), grid.group_size)))
        return out

    return solve_set


def _ggml_solver(types: dict[str, str], opts: Int4Options, report: dict) -> Callable:
    """GPTQ of one matrix on its llama.cpp block grid (`types`: weight name -> GGML type of llama.cpp's mix): the
    grid's scales solved first from the weights, weighted by the Hessian's diagonal (the imatrix), then GPTQ's column
    updates against it. `solve(name, W, H)` returns (dequantized weight, stored tensors: the blocks the GGUF file
    holds, toolkit/core/quantized.py's toolkit_gguf)."""
    from quant.gptq import gptq_on_grid
    from toolkit.core import ggml_grid

    def solve(name, W, H):
        grid = ggml_grid.solve(W, types[name], torch.diag(H))  # act-order keeps it; else solved as GPTQ goes
        codes, damp, retries = gptq_on_grid(W, H, grid, opts.damp, opts.act_order)
        if not torch.isfinite(codes).all():
            raise FloatingPointError(f"GPTQ produced non-finite values for {name}")
        if retries:
            report.setdefault("damp_raised", {})[name] = damp
        return grid.values(codes), {"ggml_blocks": torch.from_numpy(ggml_grid.pack(grid, codes))}

    return solve


def _shared_input_sets(layer: torch.nn.Module, prefix: str) -> list[list[tuple[str, torch.nn.Linear]]]:
    """The block's linear layers grouped by the input they read (q/k/v; o; gate/up; down -- or fc1; fc2)."""
    by_input: dict[str, list] = {}
    for name, mod in layer.named_modules():
        if isinstance(mod, torch.nn.Linear):
            key = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                   "up_proj": "gate_up"}.get(name.rsplit(".", 1)[-1], name)
            by_input.setdefault(key, []).append((f"{prefix}{name}.weight", mod))
    return list(by_input.values())


def _ggml_checkpoint(bundle: ModelBundle, out: Path, opts: Int4Options, device: str, progress, report: dict,
                     threads: int, gguf_blocks: Callable | None) -> tuple[dict, dict]:
    """`--target gguf:TYPE`: llama.cpp's own quantizer makes the file type's tensor mix; GPTQ then solves every
    decoder linear layer, and the output head (the tied embedding too) unless --no-gptq-head, on the grid of the
    type llama.cpp gave it; what it does not solve keeps llama.cpp's rounding. Stored as the file's blocks, so
    `export gguf --outtype TYPE` writes them unchanged."""
    from toolkit.core import ggml_grid
    from toolkit.core.quantized import GGUF_METHOD

    if gguf_blocks is None:
        raise RuntimeError("--target gguf:TYPE needs llama.cpp's quantizer: RunContext.gguf_blocks is not set")
    ftype = opts.target.split(":", 1)[1]
    stored = gguf_blocks(bundle, ftype, threads, out.parent)
    linears = quantized_linears(bundle)
    types = {n: stored[n][0] for n in linears if n in stored and stored[n][0] in ggml_grid.GEOMETRY}
    tensors = {n: {"ggml_blocks": torch.from_numpy(b)} for n, (_, b) in stored.items()}
    head = "lm_head.weight" if "lm_head.weight" in stored else EMBED if bundle.config.tie_word_embeddings else ""
    if opts.method == "gptq":
        solve = _ggml_solver(types, opts, report)

        def solve_set(mods, H):  # a type without a grid here keeps llama.cpp's rounding (none in its K/0 mixes)
            return [(n, m, *solve(n, m.weight.data.float(), H)) if n in types else
                    (n, m, ggml_grid.dequantize_blocks(stored[n][1], stored[n][0], tuple(m.weight.shape)), tensors[n])
                    for n, m in mods]

        solve_head = None
        if opts.gptq_head and head in stored and stored[head][0] in ggml_grid.GEOMETRY:
            types[head] = stored[head][0]

            def solve_head(H):
                return {head: solve(head, bundle.load(head, torch.float32).to(device), H)[1]}

        tensors.update(_gptq_layers(bundle, opts, device, progress, report, solve_set, solve_head))
    report["llama_cpp_rounded"] = sorted(n for n in stored if n not in types or opts.method != "gptq")
    qconfig = {"quant_method": GGUF_METHOD, "ggml_ftype": ftype, "toolkit_method": opts.method,
               "desc_act": opts.act_order, "damp_percent": opts.damp, "gptq_head": head in types,
               "tensor_types": {n: t for n, (t, _) in sorted(stored.items())},
               "format": "P.ggml_blocks uint8 [rows, bytes]: the tensor as llama.cpp's GGUF stores it (Hugging Face "
                         "row order); its GGML type in tensor_types"}
    return tensors, qconfig


def quantize_checkpoint(bundle: ModelBundle, out: Path, kind: str, opts: Int4Options | None = None,
                        device: str = "cpu", progress: Callable[[int, int], None] = lambda done, total: None,
                        threads: int = 1, gguf_blocks: Callable | None = None) -> dict:
    """Write the quantized Hugging Face folder into `out` (an empty folder); returns a report. `gguf_blocks` is
    llama.cpp's quantizer for `--target gguf:TYPE` (RunContext.gguf_blocks; exporters/gguf/exporter.py)."""
    from toolkit.checkpoints.hf_writer import save_hf

    refuse_quantized(bundle)
    names = quantized_linears(bundle)
    opts = opts or Int4Options()
    report: dict = {"kind": kind, "quantized_linears": len(names)}
    t0 = time.perf_counter()
    if kind == "int8":
        tensors = {}
        for k, name in enumerate(names):
            tensors[name] = _int8(bundle.load(name, torch.float32))
            progress(k + 1, len(names))
        qconfig = {"quant_method": INT8_METHOD, "bits": 8, "symmetric": True, "granularity": "per_output_channel",
                   "weight_only": True, "modules_not_quantized": ["model.embed_tokens", "lm_head"],
                   "format": "P.weight int8 [out, in], P.weight_scale float32 [out]; "
                             "weight = weight_scale[:, None] * weight"}
    elif opts.target != "gptq-v1":
        tensors, qconfig = _ggml_checkpoint(bundle, out, opts, device, progress, report, threads, gguf_blocks)
    else:
        check_group_size(bundle, opts.group_size)
        if opts.method == "gptq":
            tensors = _gptq_layers(bundle, opts, device, progress, report, _v1_solver(opts, report))
        else:
            grid = Grid(4, opts.group_size, opts.sym)
            tensors = {}
            for k, name in enumerate(names):
                tensors[name] = _rtn4(bundle.load(name, torch.float32), grid)
                progress(k + 1, len(names))
        qconfig = {"quant_method": "gptq", "bits": 4, "group_size": opts.group_size, "desc_act": opts.act_order,
                   "static_groups": True, "sym": opts.sym, "true_sequential": False, "damp_percent": opts.damp,
                   "checkpoint_format": "gptq", "format": "gptq", "pack_dtype": "int32", "lm_head": False,
                   "toolkit_method": opts.method}
        if opts.embed_bits == 8:
            tensors[EMBED] = _int8(bundle.load(EMBED, torch.float32))
            qconfig["toolkit_embed_bits"] = 8
            qconfig["toolkit_embed_format"] = ("model.embed_tokens.weight int8 [vocab, hidden], "
                                               "model.embed_tokens.weight_scale float32 [vocab]; "
                                               "embedding = weight_scale[:, None] * weight")
    report["seconds"] = time.perf_counter() - t0
    for parts in tensors.values():
        for t in parts.values():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise FloatingPointError("quantization produced NaN or inf")
    save_hf(bundle, out, replace=tensors)
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"] = qconfig
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    report["quantization_config"] = qconfig
    return report


def verify_checkpoint(bundle: ModelBundle, folder: Path, kind: str) -> dict:
    """The written folder, read back as every command reads it (dequantized by the loader), against the source model
    on the shared verification text, judged by the shared verifier's bar for the kind (toolkit/core/verify.py)."""
    from toolkit.checkpoints import load_checkpoint
    from toolkit.core.streamed_model import reference_model
    from toolkit.core.verify import judge, verification_ids

    ids = torch.tensor([verification_ids(bundle.tokenizer, bundle.config.vocab_size)])
    with torch.no_grad():
        ref = reference_model(bundle)(ids)[0].numpy()
        got = reference_model(load_checkpoint(folder))(ids)[0].numpy()
    return judge(ref, got, f"checkpoint:{kind}", f"the {kind} checkpoint's logits")


def write_checkpoint_manifest(bundle: ModelBundle, folder: Path, name: str, kind: str, report: dict,
                              source_hash=None) -> None:
    """The quantized folder's manifest.json (toolkit/core/manifest.py), written into `folder` (the partial folder
    that becomes `name`); the torch runtime opens it, reading the weights through the Hugging Face loader."""
    from toolkit.core import manifest

    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    details = {k: v for k, v in report.items() if k not in ("verification", "quantization_config")}
    manifest.write(folder / manifest.FOLDER_FILE, manifest.build(
        format="checkpoint", runtime="torch", artifact=name, bundle=bundle, dtype=kind, size_bytes=size,
        versions=manifest.package_versions("torch", "safetensors", "edge-toolkit"),
        verification=report.get("verification"), source_hash=source_hash,
        quantization=report["quantization_config"], details=details))


def run_int8(src: Path, dest: Path, opts, ctx: RunContext) -> Outcome:
    """`quantize int8 --format hf` (quant/targets.py)."""
    return _run("int8", src, dest, None, "cpu", ctx)


def run_int4(src: Path, dest: Path, opts: Int4Options, ctx: RunContext) -> Outcome:
    """`quantize int4 --format hf` (quant/targets.py): the options checked before the checkpoint is read."""
    if opts.method not in ("gptq", "rtn"):
        raise ToolkitError(f"unknown --method '{opts.method}'", "use gptq or rtn")
    if opts.seqlen < 1 or opts.nsamples < 1 or not 0 < opts.damp <= 1:
        raise ToolkitError("--seqlen and --nsamples must be positive and --damp in (0, 1]",
                           "the defaults are 512, 128 and 0.01")
    if opts.embed_bits not in (16, 8):
        raise ToolkitError(f"--embed-bits {opts.embed_bits} is not supported", "use 16 (as stored) or 8")
    check_target(opts)
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _run("int4", src, dest, opts, device, ctx)


def _run(kind: str, src: Path, dest: Path, opts: Int4Options | None, device: str, ctx: RunContext) -> Outcome:
    import contextlib
    import shutil

    from toolkit.core.manifest import SourceHash
    from toolkit.core.outputs import atomic_output
    from toolkit.core.verify import verified_line

    bundle = ctx.load(src)
    refuse_quantized(bundle)
    if opts is not None and opts.target == "gptq-v1":
        check_group_size(bundle, opts.group_size)
    if opts is not None:
        if opts.method == "gptq":
            calibration_ids(bundle, opts)  # bad calibration text fails before any work
    what = "layers" if opts is not None and opts.method == "gptq" else "linear layers"
    source_hash = SourceHash(bundle.provenance)
    bar = ctx.progress(f"{kind} {what}") if ctx.progress else contextlib.nullcontext(lambda done, total: None)
    with atomic_output(dest, ctx.force, directory=True) as work:
        with bar as progress:
            try:
                report = quantize_checkpoint(bundle, work, kind, opts, device, progress, ctx.threads,
                                             ctx.gguf_blocks)
            except FloatingPointError as e:
                raise ToolkitError(f"quantization failed: {e}", "raise --damp or give more calibration text")
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
    return Outcome(dest, f"{kind} {report['quantized_linears']} linear layers in {report['seconds']:.1f} s{extra}; "
                         f"weights {size / 1e6:.1f} MB; verified ({verified_line(report['verification'])})",
                   report=report)

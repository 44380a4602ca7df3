"""The one verifier: an artifact's logits against the reference model's on the same tokens, judged by figures that
scale with the model.

Every exporter and quantizer hands this module two arrays of logits over the same positions (the reference model
on the source weights, and the artifact in its own runtime) and a `Bar`, the thresholds of the artifact's type:

- float-class types (f32, f16, bf16, fp32 ONNX, 16-bit MNN) are judged by the largest |logit difference| relative
  to the largest |reference logit| — a fixed absolute bound tuned on a 4-layer model cannot judge a 30-layer model
  whose logits reach ±36 — and by next-token agreement;
- rounded types (8- and 4-bit weights, engines that round activations inside their matmuls) by the distribution:
  mean and 99th-percentile KL divergence of the artifact's next-token distribution from the reference's, and
  top-1 agreement. The max |Δlogit| is still reported.

The bars (BARS) were set from measurement on real trained models (SmolLM2-135M-Instruct and the session's trained
test model): the files that the field's own tools make of the same type — llama.cpp's converter + quantizer, ONNX
Runtime's quantizers, MNN's converter — pass with margin, and the mutation tests (q/k permutation left out, RoPE
theta x10, a token id shifted, two layers swapped, RMS eps wrong, a norm weight zeroed) fail. docs/BENCHMARKS.md
records the figures the bars came from.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from toolkit.core.errors import VerificationError

# Natural text of several kinds (prose, code, numbers, non-Latin scripts, emoji): distribution figures need real
# next-token distributions, which a repeated short string does not give a trained model.
VERIFY_TEXT = (
    "The history of the lighthouse begins with fires lit on hilltops to guide ships home. By the third century BC "
    "the Pharos of Alexandria stood over a hundred metres tall, and its light could be seen far out to sea. "
    "Modern lighthouses use lenses invented by Augustin Fresnel in 1822, which bend light into a narrow beam.\n\n"
    "def moving_average(values, window=3):\n"
    "    \"\"\"Return the mean of each run of `window` consecutive values.\"\"\"\n"
    "    return [sum(values[i:i + window]) / window for i in range(len(values) - window + 1)]\n\n"
    "In 2024, the station logged 3,651 visitors; ticket prices rose from $4.50 to $6.25 (an increase of 38.9%).\n"
    "你好，世界！今天的天气很好。Привет, как дела? Ünïcödé façade naïve café ✓ 🙂🚀\n"
    "She asked whether the keeper's logbook, kept since 1897, would ever be published. \"Not while I'm here,\" "
    "he said, and closed the door.")
VERIFY_TOKENS = 128


def verification_ids(tokenizer, vocab_size: int, n_tokens: int = VERIFY_TOKENS) -> list[int]:
    """The verification text as token ids (no BOS), repeated only where a small vocabulary makes it short, and
    folded into the model's vocabulary (a tokenizer may hold more ids than a test model's embedding)."""
    ids = tokenizer.encode(VERIFY_TEXT, add_bos=False)
    ids = (ids * (n_tokens // max(1, len(ids)) + 1))[:n_tokens]
    return [i % vocab_size for i in ids]


@dataclass(frozen=True)
class Bar:
    """What an artifact type must meet. `inf`/0 leave a figure unjudged (it is still reported)."""
    max_rel_err: float = math.inf  # max |Δlogit| / max |reference logit|
    max_kld_mean: float = math.inf
    max_kld_p99: float = math.inf
    min_top1: float = 0.0  # share of positions whose argmax agrees


# Per artifact type ("<format>:<type>"). Measured figures behind each bar are in docs/BENCHMARKS.md
# ("Verification bars"); each bar is several times what the field's own tools' file of that type shows on a real
# model, and far below what a broken file shows.
BARS: dict[str, Bar] = {
    # llama.cpp: its own converter's + quantizer's files of SmolLM2-135M-Instruct measured (rel err; KLD mean, p99;
    # top-1) f32 2.3e-6; f16 2.0e-3, 4.1e-6; bf16 1.3e-2, 1.6e-4; q8_0 4.7e-3, 2.0e-2, 97.7 %; q6_k 1.4e-2, 0.14,
    # 95.3 %; q5_k_m 8.2e-2, 0.54, 92.2 %; q4_k_m 6.1e-2, 0.35, 89.1 %; q4_0 0.43, 1.9, 68.8 %. The mutated files
    # measured KLD >= 0.165 at every type (RoPE theta x10, two layers swapped, a norm zeroed, q/k not permuted,
    # eps x1000); eps /10 shows only at f32 (rel err 6.8e-4).
    "gguf:f32": Bar(max_rel_err=1e-4, min_top1=0.99),
    "gguf:f16": Bar(max_rel_err=1e-2, max_kld_mean=1e-4, min_top1=0.95),
    "gguf:bf16": Bar(max_rel_err=5e-2, max_kld_mean=2e-3, min_top1=0.95),
    "gguf:q8_0": Bar(max_kld_mean=0.02, max_kld_p99=0.15, min_top1=0.9),
    "gguf:q6_k": Bar(max_kld_mean=0.05, max_kld_p99=0.6, min_top1=0.85),
    "gguf:q5_k_m": Bar(max_kld_mean=0.15, max_kld_p99=1.2, min_top1=0.8),
    "gguf:q4_k_m": Bar(max_kld_mean=0.15, max_kld_p99=1.2, min_top1=0.75),
    "gguf:q4_0": Bar(max_kld_mean=0.8, max_kld_p99=4.0, min_top1=0.5),
    # ONNX Runtime, against the reference (fp32) or the verified fp32 graph (its quantizers). Measured on
    # SmolLM2-135M-Instruct: fp32 rel err 1.8e-6 (portable) / 2.0e-6 (ort); ONNX Runtime's dynamic int8 KLD 0.68,
    # p99 3.5, top-1 62 % (activations quantized per tensor on the fly: worse than its int4 on this model);
    # MatMulNBits int4 g32 0.39, 2.1, 66 %. Mutations at fp32: KLD >= 0.12, eps /10 rel err 6.5e-4.
    "onnx:fp32": Bar(max_rel_err=1e-4, min_top1=0.99),
    "onnx:int8": Bar(max_kld_mean=1.4, max_kld_p99=7.0, min_top1=0.45),
    "onnx:int4": Bar(max_kld_mean=0.8, max_kld_p99=4.5, min_top1=0.5),
    # MNN (its converter rounds the weights; 8/4 bits run on its low-memory kernels, int8 activations). Measured on
    # SmolLM2-135M-Instruct: 16 bits rel err 1.2e-3, KLD 1.8e-6; 8 bits (g64) KLD 0.042, p99 0.28, top-1 91 %;
    # 4 bits (g64) 0.60, 2.9, 50 %. Mutations at 16 bits: KLD >= 0.047 (eps /10 is within fp16 rounding). MNN's own
    # exporter's engine folders, run by MNN.llm: 16 bits 1.2e-3, 1.8e-6; 8 bits 0.040, 0.23, 89 %; 4 bits 0.56, 2.6,
    # 53 %.
    "mnn:16": Bar(max_rel_err=1e-2, max_kld_mean=1e-4, min_top1=0.95),
    "mnn:8": Bar(max_kld_mean=0.12, max_kld_p99=1.0, min_top1=0.75),
    "mnn:4": Bar(max_kld_mean=1.2, max_kld_p99=6.0, min_top1=0.35),
    # quantized checkpoints (`toolkit quantize --format hf`), read back dequantized. Measured on
    # SmolLM2-135M-Instruct: int8 per channel KLD 3.7e-3, p99 0.028, top-1 97 %; int4 g64 RTN 0.63, 2.8, 59 % and
    # GPTQ 0.66, 3.9, 59 % (its weights come from a Q4_1 file: already on another 4-bit grid, which GPTQ cannot
    # recover; llama.cpp's own q4_0 of the same weights: 0.43)
    "checkpoint:int8": Bar(max_kld_mean=0.02, max_kld_p99=0.15, min_top1=0.9),
    "checkpoint:int4": Bar(max_kld_mean=1.2, max_kld_p99=6.0, min_top1=0.4),
}


def bar_for(kind: str) -> Bar:
    try:
        return BARS[kind]
    except KeyError:
        raise KeyError(f"no verification bar for {kind}; known: {', '.join(BARS)}") from None


ROWS = 16  # positions judged at a time (figures)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def figures(reference: np.ndarray, artifact: np.ndarray) -> dict:
    """Figures of `artifact` against `reference`, both [positions, vocab] (any leading shape is flattened)."""
    ref = np.asarray(reference).reshape(-1, reference.shape[-1])
    got = np.asarray(artifact).reshape(-1, artifact.shape[-1])
    if ref.shape != got.shape:
        raise VerificationError(f"the artifact returned logits of shape {got.shape}, the reference {ref.shape}",
                                "the artifact's vocabulary or sequence handling differs from the model's")
    largest = float(np.abs(ref).max())
    if not np.isfinite(got).all():
        return {"positions": len(ref), "finite": False, "max_abs_diff": math.inf, "rel_err": math.inf,
                "kld_mean": math.inf, "kld_p99": math.inf, "kld_max": math.inf, "top1": 0.0,
                "max_abs_logit": largest}
    # float64, ROWS positions at a time: a 128K vocabulary's whole-array temporaries would be ~1 GB
    max_diff, kld = 0.0, []
    for start in range(0, len(ref), ROWS):
        r, g = (np.asarray(a[start:start + ROWS], np.float64) for a in (ref, got))
        max_diff = max(max_diff, float(np.abs(g - r).max()))
        lp, lq = _log_softmax(r), _log_softmax(g)
        kld.append(np.maximum((np.exp(lp) * (lp - lq)).sum(-1), 0.0))  # rounding can make a ~0 KLD negative
    kld = np.concatenate(kld)
    return {"positions": len(ref), "finite": True, "max_abs_diff": max_diff,
            "rel_err": max_diff / max(largest, 1e-30), "kld_mean": float(kld.mean()),
            "kld_p99": float(np.quantile(kld, 0.99)), "kld_max": float(kld.max()),
            "top1": float((got.argmax(-1) == ref.argmax(-1)).mean()), "max_abs_logit": largest}


def failures(fig: dict, bar: Bar) -> list[str]:
    """Which figures miss the bar, each as 'figure value > limit'."""
    bad = []
    if not fig["finite"]:
        return ["non-finite logits"]
    for key, limit in (("rel_err", bar.max_rel_err), ("kld_mean", bar.max_kld_mean),
                       ("kld_p99", bar.max_kld_p99)):
        if not fig[key] <= limit:
            bad.append(f"{key} {fig[key]:.3g} > {limit:.3g}")
    if not fig["top1"] >= bar.min_top1:
        bad.append(f"top1 {fig['top1']:.3f} < {bar.min_top1:.3f}")
    return bad


def judge(reference: np.ndarray, artifact: np.ndarray, kind: str, what: str, bar: Bar | None = None) -> dict:
    """Figures + the bar they were judged by; raises VerificationError (exit 1, nothing kept) when one misses."""
    bar = bar or bar_for(kind)
    fig = figures(reference, artifact)
    result = {**fig, "judged_as": kind, "bar": {k: v for k, v in asdict(bar).items()
                                                if v not in (math.inf, 0.0)}}
    bad = failures(fig, bar)
    result["passed"] = not bad
    if bad:
        raise VerificationError(f"{what} differs from the reference model: {'; '.join(bad)} ({summary(fig)})",
                                "the artifact is not kept; report this with --debug output")
    return result


def summary(fig: dict) -> str:
    """One line of the figures for the console."""
    if not fig.get("finite", True):
        return "non-finite logits"
    return (f"max |Δlogit| {fig['max_abs_diff']:.3g} ({fig['rel_err']:.2e} of the largest logit), "
            f"KLD mean {fig['kld_mean']:.2e} p99 {fig['kld_p99']:.2e}, top-1 {100 * fig['top1']:.1f}% "
            f"over {fig['positions']} positions")


def first_difference(want: list[int], got: list[int]) -> int | None:
    """The first position where two token sequences differ (a missing token counts), or None when equal."""
    return next((i for i, (a, b) in enumerate(zip(want + [-1], got + [-2])) if a != b), None) if want != got else None


def verified_line(fig: dict) -> str:
    """The figures and the bar they were judged by, for the closing line of an export or quantization."""
    bar = ", ".join(f"{k.replace('max_', '').replace('min_', '')} {val:g}" for k, val in fig["bar"].items())
    return f"{summary(fig)}; bar for {fig['judged_as']}: {bar}"

"""Quality metrics against the baseline, as llama-perplexity --kl-divergence defines them.

The baseline is kept per scored position in a bounded form (written once, cached on disk): the log-probabilities of
its TOP_K most likely tokens and their ids, the log-probability of the correct token and the argmax. That is
TOP_K x 12 + 16 bytes a position (784 bytes at TOP_K 64: 19 MB for the 24k scored positions of a 48k-token text),
independent of the vocabulary, where llama.cpp's full uint16 log-prob file grows with it (11 GiB for Llama 2 on
WikiText-2).

KLD from that form is computed over the TOP_K tokens plus one bin holding the rest of both distributions. Merging
outcomes can only lower a KL divergence, so this is a lower bound of the full-vocabulary KLD, short of it by at
most what the tail contributes; it is exact when the two distributions agree (KLD 0 against itself).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOP_K = 64
TINY = 1e-30


def logsumexp(rows: np.ndarray) -> np.ndarray:
    """log Σ exp per row [N, 1] in float64, from float32 logits: the exponentials in float32 (one pass, half the
    memory of float64 at a 150K vocabulary), summed in float64. A log-prob is then `logit - logsumexp`, computed
    the same way for the baseline and every row, so a model scored against itself gives KLD 0 exactly."""
    rows = np.asarray(rows, np.float32)
    m = rows.max(axis=-1, keepdims=True)
    total = np.exp(rows - m).sum(axis=-1, dtype=np.float64, keepdims=True)
    return m.astype(np.float64) + np.log(total)


def gathered_logp(rows: np.ndarray, lse: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log-probs of `ids` [N, K] (or [N]) in each row."""
    if ids.ndim == 1:
        return rows[np.arange(len(ids)), ids].astype(np.float64) - lse[:, 0]
    return np.take_along_axis(rows, ids.astype(np.int64), axis=-1).astype(np.float64) - lse


@dataclass
class BaselineRecord:
    """Per scored position: top-k log-probs and ids, log-prob of the target, argmax; plus the targets."""
    top_logp: np.ndarray  # float64 [N, K] (float32 would make a model's KLD against itself ~1e-8, not 0)
    top_ids: np.ndarray  # int32 [N, K]
    target_logp: np.ndarray  # float64 [N]
    argmax: np.ndarray  # int32 [N]
    targets: np.ndarray  # int32 [N]

    @classmethod
    def from_logits(cls, rows: np.ndarray, targets: np.ndarray, k: int = TOP_K,
                    top_ids: np.ndarray | None = None) -> "BaselineRecord":
        """rows: float32 logits [N, V] at the scored positions. top_ids: the K largest per row when the caller has
        them already (torch.topk in the harness); otherwise found here."""
        rows = np.asarray(rows, np.float32)
        lse = logsumexp(rows)
        k = min(k, rows.shape[-1])
        ids = top_ids if top_ids is not None else np.argpartition(-rows, k - 1, axis=-1)[:, :k]
        top = gathered_logp(rows, lse, ids)
        order = np.argsort(-top, axis=-1, kind="stable")
        ids, top = np.take_along_axis(ids, order, -1), np.take_along_axis(top, order, -1)
        targets = np.asarray(targets).astype(np.int64)
        return cls(top, ids.astype(np.int32), gathered_logp(rows, lse, targets),
                   rows.argmax(-1).astype(np.int32), targets.astype(np.int32))

    @classmethod
    def concat(cls, parts: list["BaselineRecord"]) -> "BaselineRecord":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                     ("top_logp", "top_ids", "target_logp", "argmax", "targets")))

    def slice(self, start: int, stop: int) -> "BaselineRecord":
        return BaselineRecord(self.top_logp[start:stop], self.top_ids[start:stop], self.target_logp[start:stop],
                              self.argmax[start:stop], self.targets[start:stop])

    def save(self, path) -> None:
        np.savez(path, top_logp=self.top_logp, top_ids=self.top_ids, target_logp=self.target_logp,
                 argmax=self.argmax, targets=self.targets)

    @classmethod
    def load(cls, path) -> "BaselineRecord":
        with np.load(path) as z:
            return cls(z["top_logp"], z["top_ids"], z["target_logp"], z["argmax"], z["targets"])


@dataclass
class Comparison:
    """Per scored position figures of a candidate against the baseline."""
    nll: np.ndarray
    kld: np.ndarray
    same_top: np.ndarray
    dp: np.ndarray  # p_candidate(target) - p_baseline(target)

    @classmethod
    def concat(cls, parts: list["Comparison"]) -> "Comparison":
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("nll", "kld", "same_top", "dp")))


def compare_rows(rows: np.ndarray, base: BaselineRecord) -> Comparison:
    """rows: candidate logits [N, V] at the baseline's scored positions."""
    rows = np.asarray(rows, np.float32)
    lse = logsumexp(rows)
    p_top = np.exp(base.top_logp)
    q_top_logp = gathered_logp(rows, lse, base.top_ids)
    kld = (p_top * (base.top_logp - q_top_logp)).sum(-1)
    p_tail = np.clip(1.0 - p_top.sum(-1), 0.0, 1.0)
    q_tail = np.clip(1.0 - np.exp(q_top_logp).sum(-1), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.where(p_tail > 1e-12, p_tail * (np.log(np.maximum(p_tail, TINY)) - np.log(np.maximum(q_tail, TINY))),
                        0.0)
    target_logq = gathered_logp(rows, lse, base.targets.astype(np.int64))
    return Comparison(-target_logq, np.maximum(kld + tail, 0.0), rows.argmax(-1) == base.argmax,
                      np.exp(target_logq) - np.exp(base.target_logp))


def summarize(c: Comparison, baseline_nll_mean: float, n_bytes: int) -> dict:
    from toolkit.core.perplexity import summarize as ppl_summary

    ppl = ppl_summary(c.nll, 0, 0)
    n = len(c.nll)
    same = float(c.same_top.mean())
    return {
        "ppl": ppl.ppl, "ppl_err": ppl.ppl_err,
        "ppl_delta_pct": 100.0 * (np.exp(ppl.nll_mean - baseline_nll_mean) - 1.0),
        "bpb": float(c.nll.sum() / np.log(2) / n_bytes) if n_bytes else None,
        "kld_mean": float(c.kld.mean()), "kld_median": float(np.median(c.kld)),
        "kld_p95": float(np.percentile(c.kld, 95)), "kld_p99": float(np.percentile(c.kld, 99)),
        "same_top_pct": 100.0 * same, "same_top_err_pct": 100.0 * float(np.sqrt(same * (1 - same) / max(n - 1, 1))),
        "rms_dp_pct": 100.0 * float(np.sqrt((c.dp ** 2).mean())), "n_scored": n,
    }


def tokenizer_difference(check: dict) -> str:
    """A row's tokenizer check (worker.tokenizer_check) that failed, as the report says it."""
    return (f"its tokenizer differs from the checkpoint's at token {check['index']} of {check['checked_tokens']}: "
            f"{check.get('ours')} {check.get('ours_text', '')!r} vs its {check.get('theirs')} "
            f"{check.get('theirs_text', '')!r} (scored on the checkpoint's ids)")

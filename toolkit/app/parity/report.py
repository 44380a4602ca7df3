"""The parity report: a rich table on the terminal, parity.json (DESIGN.md's shape), parity.md and parity.png."""
from __future__ import annotations

import json
from pathlib import Path


def _fmt(v, spec: str, none: str = "–") -> str:
    return none if v is None else format(v, spec)


def table_rows(result: dict) -> list[list[str]]:
    b = result["baseline"]
    rows = [[f"baseline torch {b['dtype']} {b['device']}", "checkpoint", f"{b['size_bytes'] / 1e6:.1f}",
             f"{b['ppl']:.4f} ± {b['ppl_err']:.4f}", "–", "0", "100", "0",
             f"{b['prefill_tps']:.0f} ± {b['prefill_tps_std']:.0f}",
             f"{b['decode_tps']:.1f} ± {b['decode_tps_std']:.1f}", "1", "–", "ok"]]
    for r in result["rows"]:
        if r["status"] != "ok":
            rows.append([r["name"], r.get("format") or "?", f"{r['size_bytes'] / 1e6:.1f}", "–", "–", "–", "–", "–",
                         "–", "–", "–", "–", f"failed: {r['error']}"])
            continue
        where = r.get("device")
        fmt = r["format"] + (f" ({where})" if where and where != b["device"] else "")
        rows.append([r["name"], fmt, f"{r['size_bytes'] / 1e6:.1f}", f"{r['ppl']:.4f} ± {r['ppl_err']:.4f}",
                     f"{r['ppl_delta_pct']:+.3f}", f"{r['kld_mean']:.6f}", f"{r['same_top_pct']:.2f}",
                     f"{r['rms_dp_pct']:.3f}", f"{r['prefill_tps']:.0f} ± {r['prefill_tps_std']:.0f}",
                     f"{r['decode_tps']:.1f} ± {r['decode_tps_std']:.1f}",
                     f"{r['decode_ratio']:.3f} ± {r['decode_ratio_std']:.3f}",
                     f"{r['peak_rss_bytes'] / 1e6:.0f}", _status(r)])
    return rows


def _status(row: dict) -> str:
    from toolkit.app.parity.metrics import tokenizer_difference

    check = row.get("tokenizer")
    return "ok" if not check or check["same"] else tokenizer_difference(check)


HEADER = ["artifact", "format", "size MB", "PPL", "ΔPPL %", "KLD mean", "same top %", "RMS Δp %", "prefill tok/s",
          "decode tok/s", "decode × baseline", "peak RSS MB", "status"]


def floor_note(baseline: dict) -> str:
    """What a baseline below float32 is worth: the float32 model scored against it (rows at this level cannot be
    told from exact)."""
    f = baseline.get("floor")
    if not f:
        return ""
    return (f" (the float32 model scored against it on {f['chunks']} chunks: KLD {f['kld_mean']:.2e}, same top "
            f"{f['same_top_pct']:.2f} %, ΔPPL {f['ppl_delta_pct']:+.3f} %: rows near these figures are within the "
            f"baseline's own rounding)")


def markdown(result: dict) -> str:
    b = result["baseline"]
    lines = [f"# Parity report: {result['checkpoint']}", "",
             f"Text: {b['text']} ({b['n_tokens']} tokens, {b['n_scored']} scored; ctx {b['ctx']}, second half of "
             f"each chunk scored). Baseline: torch {b['dtype']} on {b['device']}{floor_note(b)}. "
             f"Speed: {b['bench']}, median ± std of {result['repeats']} interleaved rounds (each round times every "
             f"row once, each in a fresh process), "
             f"{result['threads']} thread(s); decode × baseline: the median of each round's ratio to the baseline's "
             f"decode speed in that round. Machine: {result['machine']}. "
             f"Date: {result['date']}.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in table_rows(result)]
    lines += ["", "KLD, same-top and RMS Δp against the baseline as llama-perplexity --kl-divergence defines them "
                  "(KLD over the baseline's 64 most likely tokens plus one bin for the rest)."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(8, 5))
    b = result["baseline"]
    ax.scatter([b["decode_tps"]], [1e-7], s=max(20, b["size_bytes"] / 1e6 * 4), c="black", alpha=0.6)
    ax.annotate("baseline", (b["decode_tps"], 1e-7), fontsize=8)
    for r in ok:
        y = max(r["kld_mean"], 1e-7)
        ax.scatter([r["decode_tps"]], [y], s=max(20, r["size_bytes"] / 1e6 * 4), alpha=0.6)
        ax.annotate(r["name"], (r["decode_tps"], y), fontsize=8)
    ax.set_xlabel(f"decode tokens/s ({b['bench']}, {result['threads']} thread(s))")
    ax.set_ylabel("mean KLD vs baseline (log; 1e-7 = exact)")
    ax.set_yscale("log")
    ax.set_title("quality vs speed (marker area ∝ size)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, folder: Path) -> None:
    (folder / "parity.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    (folder / "parity.md").write_text(markdown(result))
    plot(result, folder / "parity.png")


def print_table(result: dict, console) -> None:
    from rich.table import Table

    b = result["baseline"]
    t = Table(title=f"parity vs torch {b['dtype']} {b['device']} baseline{floor_note(b)}")
    for h in HEADER:
        t.add_column(h, justify="left" if h in ("artifact", "format", "status") else "right")
    for row in table_rows(result):
        t.add_row(*row, style=None if row[-1] == "ok" else "red")
    console.print(t)

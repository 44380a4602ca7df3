"""eval-parity against oracles nobody here wrote: transformers for the baseline's perplexity, llama-cpp-python's
logits for a GGUF row; and the gates and input checks of the CLI contract."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import assert_usage_error, run_cli
from toolkit.core.tokenizer import Tokenizer

CTX = 128


def _chunks(model_dir, ctx=CTX):
    """llama-perplexity's chunks, written out here: non-overlapping ctx tokens, BOS over the first if added."""
    tok = Tokenizer.from_dir(model_dir)
    ids = tok.encode((model_dir / "heldout.txt").read_text(encoding="utf-8"), add_bos=False)
    chunks = [ids[i * ctx:(i + 1) * ctx] for i in range(len(ids) // ctx)]
    if tok.add_bos:
        chunks = [[tok.bos_id] + c[1:] for c in chunks]
    return chunks


def _ppl_from(logits_per_chunk, chunks, ctx=CTX) -> float:
    nll = []
    for logits, chunk in zip(logits_per_chunk, chunks):
        logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64), dim=-1)
        for pos in range(ctx // 2, ctx - 1):
            nll.append(-float(logp[pos, chunk[pos + 1]]))
    return math.exp(sum(nll) / len(nll))


@pytest.fixture(scope="module")
def parity_run(trained_model, tmp_path_factory):
    """eval-parity on the trained model with two rows: the checkpoint itself and its f32 GGUF."""
    root = tmp_path_factory.mktemp("parity")
    gguf = root / "model-f32.gguf"
    proc = run_cli("export", "gguf", trained_model, "-o", gguf, "--outtype", "f32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = root / "report"
    proc = run_cli("eval-parity", trained_model, trained_model, gguf, "-o", out, "--ctx", CTX, "--repeats", "2",
                   "--device", "cpu", env={"XDG_CACHE_HOME": str(root / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "parity.json").read_text()), out, gguf, root


def test_baseline_ppl_equals_transformers(parity_run, trained_model):
    from transformers import AutoModelForCausalLM

    result, *_ = parity_run
    chunks = _chunks(trained_model)
    model = AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = [model(torch.tensor([c])).logits[0] for c in chunks]
    expected = _ppl_from(logits, chunks)
    assert result["baseline"]["device"] == "cpu" and result["baseline"]["dtype"] == "float32"
    assert abs(result["baseline"]["ppl"] / expected - 1) < 1e-6, (result["baseline"]["ppl"], expected)
    assert result["baseline"]["n_scored"] == len(chunks) * (CTX // 2 - 1)


def test_baseline_against_itself_is_exact(parity_run):
    result, *_ = parity_run
    row = result["rows"][0]
    assert row["status"] == "ok" and row["runtime"] == "torch"
    assert row["kld_mean"] == 0.0 and row["same_top_pct"] == 100.0 and row["rms_dp_pct"] < 1e-9
    assert row["ppl"] == pytest.approx(result["baseline"]["ppl"], rel=1e-12)
    # timed in two interleaved rounds, each row and the baseline once a round
    assert len(result["baseline"]["decode_rounds"]) == len(row["decode_rounds"]) == 2
    assert result["baseline"]["decode_ratio"] == 1.0 and row["decode_ratio"] > 0


def test_gguf_row_equals_llama_perplexity_definition(parity_run, trained_model):
    from runtimes.llama_cpp import LlamaCppRuntime

    result, _, gguf, _ = parity_run
    row = result["rows"][1]
    assert row["status"] == "ok" and row["runtime"] == "llama_cpp" and row["format"] == "gguf"
    chunks = _chunks(trained_model)
    rt = LlamaCppRuntime(gguf, threads=1, ctx=CTX)
    expected = _ppl_from([rt.logits(c) for c in chunks], chunks)
    assert abs(row["ppl"] / expected - 1) < 1e-4, (row["ppl"], expected)
    assert row["kld_mean"] < 1e-6 and row["same_top_pct"] > 99.5
    for key in ("decode_tps", "prefill_tps", "peak_rss_bytes", "size_bytes", "bits_per_weight", "bpb", "kld_p99"):
        assert row[key] is not None and row[key] > 0, key


def test_llama_cpp_scores_only_the_asked_positions_and_the_same_numbers(parity_run, trained_model):
    """The row's logits come from llama.cpp's output flags (positions ctx/2.. only): bit-identical to the whole
    sequence's logits, and the context still generates as before afterwards."""
    from runtimes.llama_cpp import LlamaCppRuntime
    from toolkit.core.sampling import make_sampler

    *_, gguf, _ = parity_run
    chunk = _chunks(trained_model)[0]
    rt = LlamaCppRuntime(gguf, threads=1, ctx=CTX)
    before = rt.generate(chunk[:20], 6, make_sampler(0.0)).ids
    part = rt.logits_from(chunk, CTX // 2)
    assert part.shape == (CTX - CTX // 2, rt.llm.n_vocab())
    assert np.array_equal(part, rt.logits(chunk)[CTX // 2:])
    rt.logits_from(chunk, CTX // 2)
    assert rt.generate(chunk[:20], 6, make_sampler(0.0)).ids == before


def test_bfloat16_baseline_reports_its_own_distance_from_float32(parity_run, trained_model, tmp_path):
    """--dtype bfloat16: the report gives the float32 model scored against the baseline; llama.cpp's f32 file
    (the float32 model computed by another engine) scores the same distance over the same chunks."""
    *_, gguf, _ = parity_run
    tok = Tokenizer.from_dir(trained_model)
    text = tmp_path / "four-chunks.txt"  # at most the 4 chunks the float32 model is scored on
    text.write_text(tok.decode(tok.encode((trained_model / "heldout.txt").read_text(), add_bos=False)[:4 * CTX]))
    out = tmp_path / "report"
    proc = run_cli("eval-parity", trained_model, gguf, "-o", out, "--ctx", CTX, "--repeats", "1", "--device", "cpu",
                   "--dtype", "bfloat16", "--text", text, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "parity.json").read_text())
    base, row = result["baseline"], result["rows"][0]
    floor = base["floor"]
    assert base["dtype"] == "bfloat16" and floor["chunks"] * (CTX // 2 - 1) == base["n_scored"]
    assert 1e-7 < floor["kld_mean"] < 0.05 and row["status"] == "ok"
    assert row["kld_mean"] == pytest.approx(floor["kld_mean"], rel=0.05)
    assert row["same_top_pct"] == pytest.approx(floor["same_top_pct"], abs=1.0)
    assert "the float32 model scored against it on" in (out / "parity.md").read_text()
    assert_usage_error(run_cli("eval-parity", trained_model, gguf, "-o", tmp_path / "r2", "--ctx", CTX,
                               "--dtype", "int8"), tmp_path / "r2")


def test_report_files_and_cached_baseline(parity_run):
    result, out, _, root = parity_run
    assert {p.name for p in out.iterdir()} == {"parity.json", "parity.md", "parity.png"}
    assert (out / "parity.png").read_bytes()[:4] == b"\x89PNG"
    assert "| model-f32.gguf | gguf |" in (out / "parity.md").read_text()
    cache = list((root / "cache" / "edge-toolkit" / "parity").glob("*.npz"))
    assert len(cache) == 1 and cache[0].stat().st_size < 800 * result["baseline"]["n_scored"] + 10_000


def test_perturbed_artifact_fails_the_kld_gate(trained_model, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "perturbed"
    bad.mkdir()
    for p in trained_model.iterdir():
        if p.is_file() and p.suffix != ".safetensors":
            (bad / p.name).write_bytes(p.read_bytes())
    state = load_file(trained_model / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    state = {k: v + 0.02 * torch.randn(v.shape, generator=g) if v.ndim == 2 else v for k, v in state.items()}
    save_file(state, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "report"
    proc = run_cli("eval-parity", trained_model, bad, "-o", out, "--ctx", CTX, "--repeats", "1", "--device", "cpu",
                   "--max-kld", "0.01", env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: perturbed: mean KLD") and "--max-kld 0.01" in last
    assert (out / "parity.json").is_file()  # the report is still written


def test_bad_text_exit_2(trained_model, tmp_path):
    out = tmp_path / "report"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    short = tmp_path / "short.txt"
    short.write_text("def f(x):\n    return x\n" * 5)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café ".encode("latin-1") * 500)
    for text, words in ((empty, "is empty"), (short, "fewer than two chunks"), (latin, "not UTF-8")):
        last = assert_usage_error(run_cli("eval-parity", trained_model, "-o", out, "--text", text, "--ctx", CTX), out)
        assert words in last


def test_report_markdown_and_png_carry_the_json_figures(parity_run, tmp_path):
    """parity.md and parity.png are read back and compared with parity.json, not with the code that wrote them."""
    import matplotlib.image as mpimg

    from toolkit.app.parity.report import plot

    result, out, _, _ = parity_run
    lines = [line for line in (out / "parity.md").read_text().splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = {row[0]: dict(zip(header, row)) for row in
             ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}
    b = result["baseline"]
    base = next(v for k, v in cells.items() if k.startswith("baseline"))
    assert float(base["PPL"].split(" ± ")[0]) == pytest.approx(b["ppl"], abs=5e-5)
    assert len(cells) == 1 + len(result["rows"])
    for r in result["rows"]:
        c = cells[r["name"]]
        assert float(c["PPL"].split(" ± ")[0]) == pytest.approx(r["ppl"], abs=5e-5)
        assert float(c["ΔPPL %"]) == pytest.approx(r["ppl_delta_pct"], abs=5e-4)
        assert float(c["KLD mean"]) == pytest.approx(r["kld_mean"], abs=5e-7)
        assert float(c["same top %"]) == pytest.approx(r["same_top_pct"], abs=5e-3)
        assert float(c["size MB"]) == pytest.approx(r["size_bytes"] / 1e6, abs=0.05)
        assert float(c["decode tok/s"].split(" ± ")[0]) == pytest.approx(r["decode_tps"], abs=0.05)
        assert float(c["decode × baseline"].split(" ± ")[0]) == pytest.approx(r["decode_ratio"], abs=5e-4)
    # the picture: drawn again from parity.json alone it is the same image, pixel for pixel; drawn from figures
    # that differ in one row's KLD it is not
    shown = mpimg.imread(out / "parity.png")
    again = json.loads((out / "parity.json").read_text())
    plot(again, tmp_path / "again.png")
    assert np.array_equal(mpimg.imread(tmp_path / "again.png"), shown)
    again["rows"][-1]["kld_mean"] = again["rows"][-1]["kld_mean"] * 1000 + 1e-3
    plot(again, tmp_path / "moved.png")
    moved = mpimg.imread(tmp_path / "moved.png")
    assert moved.shape != shown.shape or not np.array_equal(moved, shown)


def test_timing_rounds_interleave_rows_and_ratio_out_a_slow_spell(monkeypatch, tmp_path):
    """Every round times every row once (order reversed every other round); a slow spell that halves every row's
    speed in one round moves the tok/s figures but not the per-round ratios to the baseline."""
    import toolkit.app.parity as parity

    calls, speed = [], {"base": 100.0, "a": 200.0, "b": 50.0}

    def fake_row(artifact, runtime, spec, work, index, mode="score"):
        assert mode == "time"
        key, rnd = str(index).rsplit("-", 1)
        calls.append((int(rnd), key))
        slow = 0.5 if rnd == "1" else 1.0  # the machine is busy during round 1
        return {"status": "ok", "prefill_tps": 10 * speed[key] * slow, "decode_tps": speed[key] * slow,
                "label": key, "peak_rss_bytes": 1}

    monkeypatch.setattr(parity, "run_row", fake_row)
    jobs = [("base", tmp_path, "torch", {}), ("a", tmp_path, "x", {}), ("b", tmp_path, "y", {})]
    out = parity.time_rounds(jobs, {}, tmp_path, 3, log=lambda line: None)
    assert calls == [(0, "base"), (0, "a"), (0, "b"), (1, "b"), (1, "a"), (1, "base"),
                     (2, "base"), (2, "a"), (2, "b")]
    assert out["a"]["decode_ratio"] == pytest.approx(2.0) and out["a"]["decode_ratio_std"] == pytest.approx(0.0)
    assert out["b"]["decode_ratio"] == pytest.approx(0.5) and out["b"]["decode_ratio_std"] == pytest.approx(0.0)
    assert out["a"]["decode_tps"] == pytest.approx(200.0) and out["a"]["decode_tps_std"] > 50
    assert out["a"]["decode_rounds"] == [200.0, 100.0, 200.0]

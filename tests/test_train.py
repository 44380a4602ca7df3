"""`toolkit train`: held-out perplexity goes down, the output is a Hugging Face folder transformers loads with our
logits, heldout.txt/calib.txt are the right splits, resume continues, torchrun trains with DDP."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from tests.conftest import ROOT, TEST_MODEL, run_cli
from toolkit.app.corpus import default_corpus
from toolkit.app.train import masked_lm_loss
from toolkit.checkpoints import load_checkpoint
from toolkit.core.model import build_model
from toolkit.core.perplexity import perplexity

QUICK = ["--hidden", "64", "--layers", "2", "--heads", "2", "--kv-heads", "1", "--ffn", "128", "--vocab-size", "512",
         "--seq-len", "64", "--batch-size", "4", "--eval-every", "5", "--save-every", "5", "--warmup", "2"]


def test_trained_model_improves_and_writes_splits(trained_model):
    log = [json.loads(line) for line in (trained_model / "train_log.jsonl").read_text().splitlines()]
    ppls = [r["heldout_ppl"] for r in log if "heldout_ppl" in r]
    assert len(ppls) == TEST_MODEL["steps"] // TEST_MODEL["eval_every"]
    assert min(ppls) < 0.7 * ppls[0] and ppls[-1] == min(ppls), ppls  # it kept learning
    assert all(math.isfinite(r["loss"]) for r in log)
    held = (trained_model / "heldout.txt").read_text()
    calib = (trained_model / "calib.txt").read_text()
    corpus = default_corpus()
    cut = int(0.9 * len(corpus))
    assert held == corpus[cut:]  # split at a character offset
    assert held[:2000] not in calib and len(calib) > 100_000
    for piece in calib.split("\n\n")[:5]:
        assert piece in corpus[:cut]


def test_trained_model_keeps_best_and_loads_in_transformers(trained_model):
    bundle = load_checkpoint(trained_model)
    assert 2e6 <= bundle.num_parameters() <= 5e6
    log = [json.loads(line) for line in (trained_model / "train_log.jsonl").read_text().splitlines()]
    best = min(r["heldout_ppl"] for r in log if "heldout_ppl" in r)
    model = build_model(bundle)
    tokens = bundle.tokenizer.encode((trained_model / "heldout.txt").read_text())

    def logits_fn(chunks):
        with torch.no_grad():
            return model(torch.tensor(chunks)).numpy()

    assert abs(perplexity(logits_fn, tokens, TEST_MODEL["seq_len"], None, 8).ppl - best) / best < 1e-4
    hf = transformers.AutoModelForCausalLM.from_pretrained(trained_model, dtype=torch.float32).eval()
    ids = torch.tensor([tokens[:96]])
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max().item() <= 1e-4


def test_masked_loss_is_zero_not_nan_on_all_padding():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), -100)
    loss = masked_lm_loss(logits, labels)
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()
    labels[0, 2] = 3
    expected = torch.nn.functional.cross_entropy(logits[0, 2:3], torch.tensor([3]))
    assert torch.allclose(masked_lm_loss(logits, labels), expected)


def test_resume_continues_the_run(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(default_corpus()[:120_000])
    first = run_cli("train", "--text", text, "-o", tmp_path / "a", "--steps", "5", *QUICK)
    assert first.returncode == 0, first.stderr
    second = run_cli("train", "--text", text, "-o", tmp_path / "b", "--steps", "10", "--resume", tmp_path / "a",
                     *QUICK)
    assert second.returncode == 0, second.stderr
    log = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    a = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert log[:5] == a  # the first five steps are carried over, not redone
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def _log(folder):
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def test_torchrun_two_processes(tmp_path):
    """Two DDP ranks train as one process with twice the accumulation does: the same global batch each step (the
    loss, gradient norm and lr logged per step agree), the two ranks end with identical weights (each rank's digest,
    gathered into training.json), and the saved weights equal the single process's within float summation order."""
    text = tmp_path / "t.txt"
    text.write_text(default_corpus()[:120_000])
    out, single = tmp_path / "ddp", tmp_path / "single"
    args = ["--text", str(text), "--steps", "6", "--device", "cpu", *QUICK, "--eval-every", "100"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           "29533", "-m", "toolkit", "train", "-o", str(out), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run_cli("train", "-o", single, *args, "--grad-accum", "2", env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["rank_weights_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1] and len(digests[0]) == 64
    assert (out / "heldout.txt").is_file() and (out / "calib.txt").is_file()
    ddp_log, one_log = _log(out), _log(single)
    assert [r["step"] for r in ddp_log] == list(range(1, 7))
    for a, b in zip(ddp_log, one_log):
        assert a["lr"] == b["lr"]
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"]), (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * abs(b["grad_norm"]), (a, b)
    assert ddp_log[-1]["loss"] < ddp_log[0]["loss"]  # it trained
    bundle, reference = load_checkpoint(out), load_checkpoint(single)
    assert bundle.config.family == "llama"
    assert sorted(bundle.tensors) == sorted(reference.tensors)
    for name in bundle.tensors:
        got, want = bundle.load(name, torch.float32), reference.load(name, torch.float32)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), name
    ids = torch.tensor([bundle.tokenizer.encode("Return the value of")])
    with torch.no_grad():
        assert np.isfinite(build_model(bundle)(ids).numpy()).all()
    assert not list(tmp_path.glob("ddp.partial-*"))


def test_ctrl_c_leaves_a_resumable_state(tmp_path):
    import signal
    import time

    text = tmp_path / "t.txt"
    text.write_text(default_corpus()[:120_000])
    dest = tmp_path / "run"
    state = tmp_path / "run.train_state.pt"
    # a constant rate after warmup (--min-lr = --lr): the schedule then does not depend on --steps, so the
    # interrupted run and an uninterrupted run of the resumed length take the same steps
    # one thread: how torch splits a reduction over threads depends on the thread count, and the three runs must
    # sum in the same order to log the same losses
    flat = [*QUICK, "--lr", "2e-3", "--min-lr", "2e-3", "--threads", "1"]
    flat[flat.index("--save-every") + 1] = "2"
    args = [sys.executable, "-m", "toolkit", "train", "--text", str(text), "-o", str(dest), "--steps", "100000",
            *flat]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: training interrupted") and f"--resume {state}" in last
    assert not dest.exists() and state.is_file()
    saved = torch.load(state, weights_only=True)["step"]
    resumed = run_cli("train", "--text", text, "-o", dest, "--steps", str(saved + 3), "--resume", state, *flat)
    assert resumed.returncode == 0, resumed.stderr
    log = [json.loads(line) for line in (dest / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, saved + 4))
    assert not state.exists() and (dest / "train_state.pt").is_file()
    # the steps after the resume are the steps an uninterrupted run takes: same loss, rate and gradient norm
    whole = run_cli("train", "--text", text, "-o", tmp_path / "whole", "--steps", str(saved + 3), *flat)
    assert whole.returncode == 0, whole.stderr
    ref = [json.loads(line) for line in (tmp_path / "whole" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ref] == [r["step"] for r in log]
    for got, want in zip(log, ref):
        for key in ("loss", "lr", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)


def test_lr_schedule_reaches_min_lr():
    from toolkit.app.train import TrainOptions, lr_at

    opts = TrainOptions(out="x", steps=10, warmup=2, lr=1.0, min_lr=0.1)
    assert lr_at(0, opts) == 0.5 and lr_at(1, opts) == 1.0 and lr_at(2, opts) == 1.0
    assert abs(lr_at(9, opts) - 0.1) < 1e-12


def test_an_interrupted_run_resumes_into_the_uninterrupted_one(tmp_path):
    """Ctrl-C after step 4 (its state saved), then --resume: steps 5-8 log the same loss, lr and gradient norm as a
    run never stopped, and the saved weights are the same."""
    from toolkit.app.train import TrainOptions, train
    from toolkit.core.errors import Interrupted

    text = tmp_path / "t.txt"
    text.write_text(default_corpus()[:120_000])
    recipe = dict(texts=[str(text)], hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=128,
                  vocab_size=512, seq_len=32, batch_size=4, steps=8, warmup=2, eval_every=4, save_every=4, threads=1)
    train(TrainOptions(out=str(tmp_path / "whole"), **recipe))

    def stop_after_4(record):
        if record["step"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(TrainOptions(out=str(tmp_path / "cut"), **recipe), progress=stop_after_4)
    state = tmp_path / "cut.train_state.pt"
    assert state.is_file() and not (tmp_path / "cut").exists()
    train(TrainOptions(out=str(tmp_path / "cut"), resume=str(state), **recipe))
    whole, cut = _log(tmp_path / "whole"), _log(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(1, 9))
    for a, b in zip(whole[4:], cut[4:]):
        for key in ("loss", "lr", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), (a["step"], key, a[key], b[key])
    want, got = load_checkpoint(tmp_path / "whole"), load_checkpoint(tmp_path / "cut")
    for name in want.tensors:
        assert torch.equal(want.load(name), got.load(name)), name

"""Shared fixtures: the session's small trained model, real data from ../shared/data, a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# The session's test model: 3.7M parameters, widths multiples of 256, trained once (about 2 minutes on 2 CPUs).
TEST_MODEL = dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=768, vocab_size=2048,
                  seq_len=128, batch_size=16, steps=400, warmup=30, eval_every=100, save_every=400, lr=3e-3)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent (real data for tests lives in ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory) -> Path:
    """A model trained with `toolkit train` on the embedded corpus: what quality tests judge quantizers on."""
    from toolkit.app.train import TrainOptions, train

    out = tmp_path_factory.mktemp("trained") / "model"
    summary = train(TrainOptions(out=str(out), threads=2, **TEST_MODEL))
    (out / "summary_for_tests.txt").write_text(f"{summary['first_heldout_ppl']} {summary['best_heldout_ppl']}")
    return out


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run `python -m toolkit ARGS` in a fresh process; returns CompletedProcess with text output."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "toolkit", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_usage_error(proc, dest: Path | None = None) -> str:
    """Exit 2, `error: … (hint: …)` as the last stderr line, no traceback, nothing at the destination."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "(hint: " in last and last.endswith(")"), last
    assert "Traceback" not in proc.stderr
    if dest is not None:
        assert not dest.exists(), f"{dest} was written"
        assert not list(dest.parent.glob(dest.name + ".partial-*")) if dest.parent.is_dir() else True
    return last

"""CUDA paths: training with autocast, and the reference model in half precision against fp32. Skipped without CUDA."""
from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import random_bundle
from toolkit.checkpoints import load_checkpoint
from toolkit.model import KVCache, build_model
from toolkit.train import TrainOptions, train

pytestmark = pytest.mark.gpu


def test_cuda_training_with_autocast(tmp_path):
    out = tmp_path / "run"
    summary = train(TrainOptions(out=str(out), device="cuda", hidden_size=128, num_layers=2, num_heads=2,
                                 num_kv_heads=1, intermediate_size=256, vocab_size=1024, seq_len=128, batch_size=32,
                                 steps=120, warmup=10, eval_every=40, save_every=120))
    assert summary["device"].startswith("cuda")
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    ppls = [r["heldout_ppl"] for r in log if "heldout_ppl" in r]
    assert ppls[-1] < 0.8 * ppls[0], ppls
    bundle = load_checkpoint(out)
    assert bundle.dtypes() == {"float32": bundle.num_parameters()}  # master weights stay fp32 under autocast


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-2), (torch.bfloat16, 2e-1)])
def test_half_precision_on_cuda_tracks_fp32(dtype, tol):
    bundle = random_bundle("qwen3", seed=2)
    ref_model = build_model(bundle)
    model = build_model(bundle, dtype, "cuda")
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = ref_model(ids)
        full = model(ids.cuda()).float().cpu()
        cache = KVCache(bundle.config, 2, 40, dtype, "cuda")
        parts = [model(ids[:, :32].cuda(), cache=cache)]
        for t in range(32, 40):
            parts.append(model(ids[:, t:t + 1].cuda(), cache=cache))
        cached = torch.cat(parts, 1).float().cpu()
    assert (full - ref).abs().max().item() < tol
    assert (cached - ref).abs().max().item() < tol
    assert (full.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95

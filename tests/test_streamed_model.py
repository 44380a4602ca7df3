"""The streamed reference (toolkit/core/streamed_model.py) computes what the whole reference model computes, bit for
bit, in every family, tied head or not; and holds one module's weights at a time."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import random_bundle
from toolkit.core.arch import FAMILIES
from toolkit.core.model import Decoder, build_model
from toolkit.core.streamed_model import reference_model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("tied", [False, True])
def test_streamed_reference_equals_the_whole_model(family, tied, monkeypatch):
    monkeypatch.setattr("toolkit.core.streamed_model.HEAD_ROWS", 96)  # the head in 4 pieces (vocabulary 320)
    bundle = random_bundle(family, tie_word_embeddings=tied)
    ids = torch.randint(0, bundle.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    model = reference_model(bundle)
    with torch.no_grad():
        want = build_model(bundle)(ids)
        got = model(ids)
        again = model(ids)  # weights come back on every call
    assert torch.equal(got, want) and torch.equal(again, want)
    if bundle.config.fam.moe:  # near-tie routing reruns the model: the whole one
        assert all(p.device.type == "cpu" for p in model.parameters())
    else:
        assert all(p.device.type == "meta" for p in model.parameters()), "weights left behind after the call"


def test_streamed_reference_loads_one_module_at_a_time():
    bundle = random_bundle("llama", tie_word_embeddings=True)
    model = reference_model(bundle)
    assert isinstance(model, Decoder)
    peak = [0]

    def count(*_):
        peak[0] = max(peak[0], sum(p.numel() for p in model.parameters() if p.device.type != "meta"))

    for module in model.modules():
        module.register_forward_hook(count, prepend=True)  # before the streaming hook drops the weights
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    largest = max(t.numel for t in bundle.tensors.values())
    assert 0 < peak[0] <= largest

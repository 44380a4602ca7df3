"""The fixed-shape decode step (what the CUDA-graph baseline replays) against the reference model's cached decode.

Run on the CPU here, without a graph: the arithmetic is the same one the graph records (tests/test_gpu.py replays it
on CUDA). Oracle: the reference model, itself held to transformers within 1e-4 (test_reference_model.py).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from runtimes.torch_runtime.runtime import TorchRuntime
from runtimes.torch_runtime.static_decode import GraphDecoder, StaticStep, capacity_for, supports
from tests.helpers import random_bundle
from toolkit.core.model import KVCache, build_model
from toolkit.core.sampling import make_sampler


def reference_decode(model, prompt, continuation):
    """Logits of every continuation token fed one at a time after the prompt, by the reference model."""
    cache = KVCache(model.config, 1, len(prompt) + len(continuation), torch.float32, "cpu")
    with torch.no_grad():
        model(torch.tensor([prompt]), cache=cache)
        return torch.stack([model(torch.tensor([[t]]), cache=cache)[0, -1] for t in continuation])


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "nanochat"])
def test_static_step_equals_reference_decode(family):
    bundle = random_bundle(family, seed=3, tie_word_embeddings=family == "llama")
    model = build_model(bundle)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 320, (20,), generator=g).tolist()
    cont = torch.randint(0, 320, (12,), generator=g).tolist()
    ref = reference_decode(model, prompt, cont)
    dec = GraphDecoder(model, capacity=48)  # larger than needed: the mask must hide the empty slots
    dec.prefill(prompt)
    got = []
    with torch.no_grad():
        for i, t in enumerate(cont):
            got.append(dec.step(torch.tensor([[t]]), torch.tensor([len(prompt) + i])))
    got = torch.cat(got)
    assert ref.abs().max() > 1.0  # logits large enough for layout mistakes to show
    assert (got - ref).abs().max().item() < 1e-4


def test_greedy_on_device_path_equals_host_sampling():
    bundle = random_bundle("qwen3", seed=4)
    model = build_model(bundle)
    prompt = list(range(5, 25))
    greedy = make_sampler(0.0)
    assert greedy.greedy and not make_sampler(0.7).greedy
    host = GraphDecoder(model, 64)
    first = greedy(host.prefill(prompt))
    plain = lambda logits: int(np.argmax(logits))  # noqa: E731  (no greedy marker: the host-sampling path)
    ids_host, why_host = host.decode(first, 40, plain)
    dev = GraphDecoder(model, 64)
    assert greedy(dev.prefill(prompt)) == first
    ids_dev, why_dev = dev.decode(first, 40, greedy, greedy=True)
    assert ids_dev == ids_host and len(ids_dev) == 40 and why_dev == why_host == "length"
    # a stop token inside a device chunk ends the output right there
    stop = ids_host[21]
    cut = ids_host.index(stop) + 1
    dev2 = GraphDecoder(model, 64)
    dev2.prefill(prompt)
    ids_stop, why = dev2.decode(first, 40, greedy, stop_ids=[stop], greedy=True)
    assert ids_stop == ids_host[:cut] and why == "stop"


def test_moe_has_no_static_step_and_capacity_rounds_up():
    model = build_model(random_bundle("qwen3_moe"))
    assert not supports(model)
    with pytest.raises(ValueError):
        StaticStep(model, 32)
    swapped = build_model(random_bundle("llama"))

    class PackedLinear(torch.nn.Linear):  # stands for bitsandbytes' layers, whose .weight is packed
        pass

    layer = swapped.model.layers[0].mlp
    layer.up_proj = PackedLinear(layer.up_proj.in_features, layer.up_proj.out_features, bias=False)
    assert supports(build_model(random_bundle("llama"))) and not supports(swapped)
    assert capacity_for(516, 2048) == capacity_for(640, 2048) == 768  # warm-up and timed run share one graph
    assert capacity_for(300, 300) == 300 and capacity_for(10, 100) == 100


def test_cpu_runtime_keeps_eager_decoding():
    rt = TorchRuntime(random_bundle("llama"), device="cpu")
    assert not rt.use_graph and rt.label == "torch float32 cpu"

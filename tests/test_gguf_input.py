"""GGUF files as input checkpoints: every architecture the table maps round-trips through the GGUF writer and the
loader, transformers' own GGUF loader reads the same tensors, and the commands work from a GGUF."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from exporters.gguf.exporter import export
from tests.conftest import run_cli
from tests.helpers import random_bundle
from toolkit.checkpoints import load_checkpoint

FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "minimind2_moe"]
# transformers' GGUF loader reads these test models. It knows qwen3, qwen3moe and qwen2moe too, but takes their
# head_dim (qwen3) and expert widths (qwen2moe: 1408) from its config classes' defaults instead of the file's
# attention.key_length / expert_feed_forward_length, so small test models do not load there (measured)
TRANSFORMERS_READS = {"llama", "qwen2"}
CONFIG_FIELDS = ("family", "vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings",
                 "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                 "shared_expert_intermediate_size")


def _bundle(family: str):
    extra = {"norm_topk_prob": False} if family == "qwen2_moe" else {}
    return random_bundle(family, seed=2, std=0.1, tie_word_embeddings=family in ("llama", "qwen3"),
                         rms_norm_eps=1e-5, **extra)


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_through_gguf(family, tmp_path):
    """f32 GGUF -> loader: the same config and, bit for bit, the same tensors (q/k rows un-permuted for the
    pair-wise archs, experts unstacked); transformers' GGUF loader reads the same tensors where it knows the arch."""
    bundle = _bundle(family)
    path = tmp_path / "m.gguf"
    export(bundle, path, "f32", verify_file=False)
    back = load_checkpoint(path)
    for name in CONFIG_FIELDS:
        assert getattr(back.config, name) == getattr(bundle.config, name), name
    assert set(back.tensors) == set(bundle.tensors)
    for name, ref in bundle.tensors.items():
        assert np.array_equal(back.tensors[name].array(), ref.array()), name
    assert back.tokenizer.encode("def function(self, value): return 42") == \
        bundle.tokenizer.encode("def function(self, value): return 42")
    if family in TRANSFORMERS_READS:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
        state = model.state_dict()
        for name, ref in back.tensors.items():
            if name in state:  # transformers keeps MoE experts fused; the dense tensors are compared one by one
                assert torch.equal(torch.from_numpy(ref.array()), state[name]), name


def test_commands_from_a_gguf(tmp_path):
    """info, convert --to hf (which transformers loads and computes identically) and export onnx from a GGUF."""
    from transformers import AutoModelForCausalLM

    from toolkit.core.model import build_model

    bundle = _bundle("qwen3")
    path = tmp_path / "m-q8_0.gguf"
    export(bundle, path, "q8_0", verify_file=False)
    proc = run_cli("info", path, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["arch"] == "qwen3" and info["format"] == "gguf" and "Q8_0" in info["stored_types"], info
    hf = tmp_path / "hf"
    proc = run_cli("convert", path, "--to", "hf", "-o", hf)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from_gguf = load_checkpoint(path)
    ids = torch.tensor([from_gguf.tokenizer.encode("The quick brown fox. def function(self, value):")])
    with torch.no_grad():
        want = build_model(from_gguf)(ids)
        got = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(ids).logits
    assert want.abs().max() > 1.0 and (got - want).abs().max() <= 1e-4
    proc = run_cli("export", "onnx", path, "-o", tmp_path / "onnx")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert manifest["verification"]["passed"] and manifest["source"]["format"] == "gguf"


def test_eval_parity_with_a_gguf_as_the_baseline(tmp_path):
    """A GGUF is a checkpoint like any other: the baseline of eval-parity, scored against its own llama.cpp row."""
    bundle = _bundle("llama")
    path = tmp_path / "m-f32.gguf"
    export(bundle, path, "f32", verify_file=False)
    text = tmp_path / "text.txt"
    text.write_text("def function(self, value):\n    return value + 1\n" * 40 + "The quick brown fox. " * 60)
    proc = run_cli("eval-parity", path, path, "--text", text, "--ctx", 64, "--repeats", 1, "-o", tmp_path / "rep")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "rep" / "parity.json").read_text())
    row = report["rows"][0]
    assert row["status"] == "ok" and row["kld_mean"] < 1e-6 and row["same_top_pct"] == 100.0, row


@pytest.mark.parametrize("outtype,dtype", [("f16", "float16"), ("bf16", "bfloat16"), ("q8_0", "float32")])
def test_stored_types_read_back_as_stored(outtype, dtype, tmp_path):
    """F16 and BF16 tensors come back in their own dtype (bf16 as its bits), bit for bit what the writer stored;
    quantized blocks come back as gguf-py dequantizes them."""
    import gguf

    bundle = _bundle("qwen2")
    path = tmp_path / f"m-{outtype}.gguf"
    export(bundle, path, outtype, verify_file=False)
    back = load_checkpoint(path)
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    name, gname = "model.layers.1.mlp.down_proj.weight", "blk.1.ffn_down.weight"
    assert back.tensors[name].dtype == dtype
    want = gguf.quants.dequantize(stored[gname].data, stored[gname].tensor_type)
    got = back.tensors[name].array()
    if dtype == "bfloat16":
        got = (got.astype(np.uint32) << 16).view(np.float32)
    assert np.array_equal(got.astype(np.float32), want.astype(np.float32))
    assert back.tensors["model.layers.1.input_layernorm.weight"].dtype == "float32"  # norms stay f32

"""config.json as transformers 4.4x-5.2x write it, one test per variant: each folder is written the way that version
writes it (by hand for the older forms, by transformers 5.23's own classes for the current ones) and must parse
into the ArchConfig fields transformers itself reads from the same folder (AutoConfig is the oracle); where weights
are at hand, the reference model on the folder equals transformers' model on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from tests.conftest import run_cli
from tests.helpers import random_bundle, tiny_tokenizer
from toolkit.checkpoints import load_checkpoint
from toolkit.checkpoints.hf_writer import save_hf
from toolkit.core.arch import config_from_hf, config_to_hf
from toolkit.core.errors import ToolkitError
from toolkit.core.model import build_model

SMALL = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96)


def _folder_with_config(tmp_path: Path, family: str, config: dict, **bundle_kw) -> Path:
    """Weights and tokenizer of a random model of `family` (toolkit's writer), config.json replaced by `config`."""
    bundle = random_bundle(family, seed=2, **bundle_kw)
    folder = tmp_path / "model"
    save_hf(bundle, folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _as_transformers_reads_it(folder: Path) -> dict:
    """The fields of ArchConfig as transformers parses the folder's config.json."""
    c = transformers.AutoConfig.from_pretrained(folder)
    params = dict(c.rope_parameters)
    theta = params.pop("rope_theta")
    params.pop("type", None)  # the old name, kept beside rope_type
    return {"head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            "num_kv_heads": c.num_key_value_heads, "tie_word_embeddings": c.tie_word_embeddings,
            "rope_theta": theta, "rope_scaling": None if params["rope_type"] == "default" else params,
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps}


def _assert_parsed_as_transformers(folder: Path, cfg) -> None:
    want = _as_transformers_reads_it(folder)
    got = {k: getattr(cfg, k) for k in want}
    assert got == want


def _assert_same_logits(folder: Path, n: int = 48) -> float:
    """Reference model on the folder == transformers' model on it, fp32 (positions past any original context)."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = build_model(load_checkpoint(folder))
    ids = torch.randint(3, 300, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    diff = (got - want).abs().max().item()
    assert want.abs().max() > 0.5 and diff <= 1e-4, diff
    return diff


def test_llama31_form_of_transformers_4_4x(tmp_path):
    """Llama 3.1/3.2 as 4.4x writes it: rope_theta beside rope_scaling {rope_type: llama3, ...}, torch_dtype, an
    explicit head_dim."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL, "head_dim": 16,
           "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 32, "rope_type": "llama3"},
           "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.45.0"}
    folder = _folder_with_config(tmp_path, "llama", cfg, rms_norm_eps=1e-5)
    got = load_checkpoint(folder).config
    assert got.rope_theta == 5e5 and got.rope_scaling == {"rope_type": "llama3", "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 32}
    assert got.extra["dtype"] == "float32" and got.head_dim == 16
    _assert_parsed_as_transformers(folder, got)
    _assert_same_logits(folder)


def test_linear_scaling_with_the_type_key_and_no_head_dim(tmp_path):
    """The older form: rope_scaling {type: linear} (no rope_type), head_dim absent (hidden / heads)."""
    cfg = {"model_type": "llama", **SMALL, "max_position_embeddings": 64, "rope_theta": 10000.0,
           "rope_scaling": {"type": "linear", "factor": 2.0}, "rms_norm_eps": 1e-6, "torch_dtype": "float32"}
    folder = _folder_with_config(tmp_path, "llama", cfg)
    got = load_checkpoint(folder).config
    assert got.rope_scaling == {"rope_type": "linear", "factor": 2.0} and got.head_dim == 16
    _assert_parsed_as_transformers(folder, got)
    _assert_same_logits(folder)


def test_rope_parameters_as_transformers_5_writes_them(tmp_path):
    """A Qwen3 with YaRN saved by transformers 5.23 itself: rope_parameters (theta inside), dtype."""
    config = transformers.Qwen3Config(**SMALL, head_dim=16, max_position_embeddings=128, initializer_range=0.2,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                       "original_max_position_embeddings": 32})
    model = transformers.Qwen3ForCausalLM(config).to(torch.float32)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save(tmp_path / "model")
    written = json.loads((tmp_path / "model" / "config.json").read_text())
    assert "rope_scaling" not in written and written["rope_parameters"]["rope_type"] == "yarn"
    assert written["dtype"] == "float32" and "torch_dtype" not in written
    got = load_checkpoint(tmp_path / "model").config
    assert got.rope_theta == 1e6 and got.rope_scaling == {"rope_type": "yarn", "factor": 4.0,
                                                          "original_max_position_embeddings": 32}
    assert got.extra["dtype"] == "float32"
    _assert_parsed_as_transformers(tmp_path / "model", got)
    _assert_same_logits(tmp_path / "model")


def test_theta_inside_rope_parameters_wins_over_the_top_level_one(tmp_path):
    """Both keys present (a config edited across versions): transformers 5 takes rope_scaling over
    rope_parameters, and a theta inside the dict over the top-level one."""
    base = {"model_type": "qwen2", **SMALL, "max_position_embeddings": 128, "rope_theta": 1e4}
    cases = [({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}, 1e6, "linear"),
             ({"rope_scaling": {"type": "linear", "factor": 3.0},
               "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}}, 1e4, "linear")]
    for extra, theta, kind in cases:
        folder = _folder_with_config(tmp_path / kind / str(theta), "qwen2", {**base, **extra})
        got = config_from_hf(json.loads((folder / "config.json").read_text()))
        assert got.rope_theta == theta and got.rope_scaling["rope_type"] == kind
        _assert_parsed_as_transformers(folder, got)


def test_qwen3_moe_folder_saved_by_transformers_5_23(tmp_path):
    """transformers 5.23's Qwen3MoeConfig writes num_local_experts (not num_experts) and fused expert tensors:
    `toolkit info` reads it, the reference equals transformers on it, and GGUF and ONNX exports verify."""
    from exporters.gguf.exporter import export as export_gguf
    from exporters.onnx.exporter import export as export_onnx

    config = transformers.Qwen3MoeConfig(**{**SMALL, "intermediate_size": 64}, head_dim=16, num_experts=4,
                                         num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                                         max_position_embeddings=256, initializer_range=0.2)
    folder = tmp_path / "moe"
    transformers.Qwen3MoeForCausalLM(config).to(torch.float32).save_pretrained(folder)
    tiny_tokenizer().save(folder)
    written = json.loads((folder / "config.json").read_text())
    assert written["num_local_experts"] == 4 and "num_experts" not in written
    bundle = load_checkpoint(folder)
    cfg = bundle.config
    assert (cfg.family, cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size, cfg.norm_topk_prob) \
        == ("qwen3_moe", 4, 2, 32, True)
    _assert_parsed_as_transformers(folder, cfg)
    _assert_same_logits(folder)
    proc = run_cli("info", folder, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["arch"] == "qwen3_moe" and info["config"]["num_experts"] == 4
    report = export_gguf(bundle, tmp_path / "moe.gguf", "f32")
    assert report.verification["passed"] and report.verification["rel_err"] <= 1e-4
    onnx = export_onnx(bundle, tmp_path / "moe-onnx", "portable", 20)
    assert onnx.verification["max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("model_type, key", [("qwen3_moe", "num_experts"), ("qwen3_moe", "num_local_experts"),
                                             ("qwen2_moe", "num_experts"), ("qwen2_moe", "num_local_experts")])
def test_expert_count_under_either_name(model_type, key):
    cfg = config_to_hf(random_bundle(model_type).config)
    experts = cfg.pop("num_experts")
    got = config_from_hf({**cfg, key: experts})
    assert got.num_experts == experts == 4
    with pytest.raises(ToolkitError, match="num_experts"):
        config_from_hf(cfg)


@pytest.mark.parametrize("model_type, head_dim, want", [
    ("llama", "absent", 16), ("llama", None, 16), ("llama", 32, 32),
    ("qwen2", "absent", 16), ("qwen2", 32, 32),
    ("qwen3", "absent", 128),  # Qwen3Config's default head_dim is 128 whatever hidden_size says
    ("qwen3", 32, 32), ("qwen3_moe", "absent", 16)])
def test_head_dim_absent_explicit_or_null(model_type, head_dim, want, tmp_path):
    cfg = {"model_type": model_type, **SMALL, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32}
    if head_dim != "absent":
        cfg["head_dim"] = head_dim
    got = config_from_hf(cfg)
    assert got.head_dim == want
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert _as_transformers_reads_it(tmp_path)["head_dim"] == want


def test_torch_dtype_and_dtype_read_alike():
    """4.x writes torch_dtype, 5.x dtype: the same config either way, the dtype kept as provenance."""
    base = config_to_hf(random_bundle("qwen3").config)
    old, new = config_from_hf({**base, "torch_dtype": "bfloat16"}), config_from_hf({**base, "dtype": "bfloat16"})
    assert old.extra == new.extra == {"dtype": "bfloat16"}
    assert old.to_dict() == new.to_dict()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "nanochat"])
def test_absent_keys_take_each_class_default(model_type, tmp_path):
    """tie_word_embeddings, num_key_value_heads, max_position_embeddings, rms_norm_eps (and NanoChat's softcap)
    left out: each class's own default (e.g. 32 key/value heads for Qwen2/Qwen3, not num_attention_heads)."""
    cfg = {"model_type": model_type, "vocab_size": 320, "hidden_size": 1024, "num_hidden_layers": 2,
           "num_attention_heads": 64, "intermediate_size": 96, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "head_dim": 16}
    got = config_from_hf(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _assert_parsed_as_transformers(tmp_path, got)
    assert got.tie_word_embeddings is False
    assert got.num_kv_heads == {"qwen2": 32, "qwen3": 32, "qwen3_moe": 4, "qwen2_moe": 16}.get(model_type, 64)
    if model_type == "nanochat":
        assert got.logit_softcap == transformers.AutoConfig.from_pretrained(tmp_path).final_logit_softcapping == 15
    if model_type in ("qwen3_moe", "qwen2_moe"):
        assert got.norm_topk_prob is transformers.AutoConfig.from_pretrained(tmp_path).norm_topk_prob is False


def test_tie_word_embeddings_absent_keeps_the_head(tmp_path):
    """A hand-written config without tie_word_embeddings: the class default (False) for every family here, so the
    folder's lm_head is the head, as transformers loads it."""
    cfg = config_to_hf(random_bundle("qwen2").config)
    del cfg["tie_word_embeddings"]
    folder = _folder_with_config(tmp_path, "qwen2", cfg)
    bundle = load_checkpoint(folder)
    assert bundle.config.tie_word_embeddings is False and "lm_head.weight" in bundle.tensors
    _assert_same_logits(folder)


def test_qwen2_sliding_window_off_with_a_window_value(tmp_path):
    """Qwen2.5's configs: use_sliding_window false beside sliding_window and max_window_layers values (full
    attention everywhere); on, the window is refused with the reason."""
    cfg = {**config_to_hf(random_bundle("qwen2").config), "use_sliding_window": False, "sliding_window": 4,
           "max_window_layers": 1}
    folder = _folder_with_config(tmp_path, "qwen2", cfg)
    assert load_checkpoint(folder).config.family == "qwen2"
    _assert_same_logits(folder)  # 48 tokens, window 4: a windowed model would differ
    with pytest.raises(ToolkitError, match="use_sliding_window"):
        config_from_hf({**cfg, "use_sliding_window": True})

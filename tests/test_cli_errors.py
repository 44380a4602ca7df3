"""Bad inputs: exit 2, `error: … (hint: …)` as the last stderr line, no traceback, nothing at the destination."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conftest import assert_usage_error, run_cli
from tests.helpers import random_bundle
from toolkit.checkpoints.hf_writer import save_hf


@pytest.fixture
def hf_dir(tmp_path):
    d = tmp_path / "model"
    save_hf(random_bundle("llama", seed=1), d)
    return d


def _edit_config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    for k in [k for k, v in changes.items() if v is None]:
        cfg.pop(k)
    (d / "config.json").write_text(json.dumps(cfg))


def test_good_convert_works(hf_dir, tmp_path):
    proc = run_cli("convert", hf_dir, "-o", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    again = run_cli("convert", hf_dir, "-o", tmp_path / "out")
    assert "already exists" in assert_usage_error(again)
    assert run_cli("convert", hf_dir, "-o", tmp_path / "out", "--force").returncode == 0


def test_truncated_safetensors(hf_dir, tmp_path):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    dest = tmp_path / "out"
    assert "truncated" in assert_usage_error(run_cli("convert", hf_dir, "-o", dest), dest)


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4), "x": Payload()}, tmp_path / "evil.pth")
    dest = tmp_path / "out"
    last = assert_usage_error(run_cli("convert", tmp_path / "evil.pth", "-o", dest), dest)
    assert "refusing" in last and "weights_only" in last
    assert not marker.exists()


def test_heads_that_do_not_divide_hidden(hf_dir, tmp_path):
    _edit_config(hf_dir, num_attention_heads=5, num_key_value_heads=5, head_dim=None)
    dest = tmp_path / "out"
    assert "do not divide" in assert_usage_error(run_cli("convert", hf_dir, "-o", dest), dest)


def test_kv_heads_that_do_not_divide_heads(hf_dir, tmp_path):
    _edit_config(hf_dir, num_key_value_heads=3)
    assert "key/value heads" in assert_usage_error(run_cli("info", hf_dir))


def test_tensor_shape_mismatch(hf_dir, tmp_path):
    _edit_config(hf_dir, intermediate_size=100)
    dest = tmp_path / "out"
    assert "has shape" in assert_usage_error(run_cli("convert", hf_dir, "-o", dest), dest)


def test_unknown_architecture(hf_dir, tmp_path):
    _edit_config(hf_dir, model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    dest = tmp_path / "out"
    assert "unknown architecture" in assert_usage_error(run_cli("convert", hf_dir, "-o", dest), dest)
    assert "unknown architecture" in assert_usage_error(run_cli("info", hf_dir, "--arch", "mamba"))


def test_unsupported_rope_scaling_is_refused(hf_dir):
    """llama3/linear/yarn/dynamic are computed (tests/test_rope_scaling.py); LongRoPE is refused with its name."""
    _edit_config(hf_dir, rope_scaling={"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0] * 8,
                                       "long_factor": [1.0] * 8, "original_max_position_embeddings": 64})
    assert "longrope" in assert_usage_error(run_cli("info", hf_dir)).lower()


def test_missing_tokenizer(hf_dir, tmp_path):
    (hf_dir / "tokenizer.json").unlink()
    dest = tmp_path / "out"
    assert "tokenizer" in assert_usage_error(run_cli("convert", hf_dir, "-o", dest), dest)


def test_empty_corpus(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    dest = tmp_path / "run"
    assert "empty" in assert_usage_error(run_cli("train", "--text", empty, "-o", dest), dest)


def test_non_utf8_corpus(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9 " * 100)
    dest = tmp_path / "run"
    assert "UTF-8" in assert_usage_error(run_cli("train", "--text", bad, "-o", dest), dest)


def test_output_parent_is_a_regular_file(hf_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    dest = blocker / "out"
    assert "is a file" in assert_usage_error(run_cli("convert", hf_dir, "-o", dest))
    assert "is a file" in assert_usage_error(run_cli("train", "-o", dest, "--steps", "1"))
    assert blocker.read_text() == "x"


def test_existing_output_without_force(hf_dir, tmp_path):
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    assert "already exists" in assert_usage_error(run_cli("train", "-o", dest, "--steps", "1"))
    assert "already exists" in assert_usage_error(run_cli("convert", hf_dir, "-o", dest))
    assert (dest / "keep.txt").read_text() == "mine"


def test_usage_errors_follow_the_contract(hf_dir):
    assert_usage_error(run_cli("info"))
    assert_usage_error(run_cli("generate", hf_dir, "--bogus"))
    assert_usage_error(run_cli("generate", hf_dir, "-p", "x", "--top-p", "0"))
    assert_usage_error(run_cli("convert", hf_dir, "--to", "tflite"))
    assert_usage_error(run_cli("train", "--heads", "3", "--steps", "1", "-o", hf_dir.parent / "x"))


def test_debug_shows_the_traceback(hf_dir):
    (hf_dir / "tokenizer.json").unlink()
    proc = run_cli("info", hf_dir, "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")


def test_generate_greedy_matches_uncached_argmax(hf_dir):
    from toolkit.checkpoints import load_checkpoint
    from toolkit.core.model import build_model

    bundle = load_checkpoint(hf_dir)
    model = build_model(bundle)
    prompt = "def function(self, value):"
    ids = bundle.tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    expected = prompt + bundle.tokenizer.decode(ids[len(bundle.tokenizer.encode(prompt)):], skip_special=True)
    proc = run_cli("generate", hf_dir, "-p", prompt, "-n", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == expected
    assert "tok/s decode" in proc.stderr


@pytest.mark.parametrize("case", ["config_list", "config_missing_key", "pth_garbage", "pth_empty", "pth_no_layers",
                                  "config_file_list", "config_file_text_heads"])
def test_damaged_inputs_exit_2(case, tmp_path, hf_dir):
    target, extra = hf_dir, []
    if case == "config_list":
        (hf_dir / "config.json").write_text("[1, 2]")
    elif case == "config_missing_key":
        _edit_config(hf_dir, hidden_size=None)
    elif case in ("pth_garbage", "pth_empty"):
        target = tmp_path / "m.pth"
        target.write_bytes(b"" if case == "pth_empty" else b"\x80\x02junk" * 50)
    else:
        target = tmp_path / "m.pth"
        torch.save({"model.embed_tokens.weight": torch.zeros(8, 4)}, target)
        if case != "pth_no_layers":
            cfg = tmp_path / "cfg.json"
            cfg.write_text("[8]" if case == "config_file_list" else '{"num_attention_heads": "eight"}')
            extra = ["--config", cfg]
    dest = tmp_path / "out"
    assert_usage_error(run_cli("convert", target, "-o", dest, "--tokenizer", hf_dir, *extra), dest)


def test_generate_rejects_wrong_device_and_runtime(hf_dir):
    assert "device" in assert_usage_error(run_cli("generate", hf_dir, "-p", "x", "--device", "gpu"))
    assert "cannot open" in assert_usage_error(run_cli("generate", hf_dir, "-p", "x", "--runtime", "llama_cpp"))


def test_training_options_are_checked_before_work(tmp_path):
    dest = tmp_path / "run"
    assert "even" in assert_usage_error(run_cli("train", "-o", dest, "--seq-len", "31"), dest)
    assert "--lr" in assert_usage_error(run_cli("train", "-o", dest, "--lr", "-1"), dest)
    assert "--grad-clip" in assert_usage_error(run_cli("train", "-o", dest, "--grad-clip", "-1"), dest)

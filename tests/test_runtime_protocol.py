"""The Runtime protocol is what every engine offers: each registered runtime's class has every method the protocol
declares with the protocol's parameters, and `runtimes.choose` picks by format the same engine for the same file."""
from __future__ import annotations

import importlib
import inspect

import pytest

import runtimes
from runtimes import RUNTIMES, Runtime
from tests.conftest import assert_usage_error, run_cli

CLASSES = {"torch": "TorchRuntime", "llama_cpp": "LlamaCppRuntime", "onnxruntime": "OnnxRuntime", "mnn": "MnnRuntime",
           "bnb_int8": "BnbRuntime", "bnb_nf4": "BnbRuntime"}
METHODS = [name for name, member in inspect.getmembers(Runtime, inspect.isfunction) if not name.startswith("_")]


def test_the_protocol_declares_what_generate_and_the_harness_call():
    assert set(METHODS) == {"logits", "generate", "prompt_ids", "chat_ids", "detokenize"}


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_runtime_class_offers_the_whole_protocol(name):
    cls = getattr(importlib.import_module(RUNTIMES[name].module), CLASSES[name])
    for method in METHODS:
        assert callable(getattr(cls, method, None)), f"{cls.__name__} lacks {method}"
        want = list(inspect.signature(getattr(Runtime, method)).parameters)
        got = list(inspect.signature(getattr(cls, method)).parameters)
        assert got[:len(want)] == want, (cls.__name__, method, got)


def test_choose_by_format(trained_model, tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "model.onnx").write_bytes(b"")
    assert runtimes.handling(gguf) == "llama_cpp"  # a GGUF is also a checkpoint: the engine's format comes first
    assert runtimes.handling(onnx_dir) == "onnxruntime"
    assert runtimes.handling(trained_model) == "torch"
    assert runtimes.handling(tmp_path / "nothing") is None
    assert runtimes.choose(tmp_path / "nothing").name == "torch"  # its loaders then say what is wrong
    rt = runtimes.open(trained_model, threads=1)
    assert rt.name == "torch" and "Return the value" in rt.detokenize(rt.prompt_ids("Return the value"))
    ids, stops = rt.chat_ids([{"role": "user", "content": "hello"}])
    assert rt.text_tokenizer().decode(ids).endswith("assistant\n") and stops


def test_choose_refuses_a_runtime_that_cannot_open_the_artifact(trained_model):
    from toolkit.core.errors import ToolkitError

    with pytest.raises(ToolkitError, match="unknown runtime 'bogus'"):
        runtimes.choose(trained_model, "bogus")
    with pytest.raises(ToolkitError, match="cannot open"):
        runtimes.choose(trained_model, "llama_cpp")


def test_generate_on_a_missing_gguf_says_so(tmp_path):
    assert "does not exist" in assert_usage_error(run_cli("generate", tmp_path / "gone.gguf", "-p", "x"))

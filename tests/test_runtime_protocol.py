"""The Runtime protocol is what every engine offers: each registered runtime's class has every method the protocol
declares with the protocol's parameters, and `runtimes.choose` picks by format the same engine for the same file."""
from __future__ import annotations

import importlib
import inspect

import pytest

import runtimes
from runtimes import RUNTIMES, Runtime
from tests.conftest import ROOT, assert_usage_error, run_cli


def runtime_class(name: str) -> type:
    """The class a runtime's load() returns: the one class of its module that has logits and generate."""
    module = importlib.import_module(RUNTIMES[name].module)
    found = [cls for _, cls in inspect.getmembers(module, inspect.isclass) if cls.__module__ == module.__name__
             and callable(getattr(cls, "logits", None)) and callable(getattr(cls, "generate", None))]
    assert len(found) == 1, (name, found)
    return found[0]


METHODS = [name for name, member in inspect.getmembers(Runtime, inspect.isfunction) if not name.startswith("_")]


def test_the_protocol_declares_what_generate_and_the_harness_call():
    assert set(METHODS) == {"logits", "generate", "prompt_ids", "chat_ids", "detokenize"}


@pytest.mark.parametrize("name", sorted(RUNTIMES))
def test_every_runtime_class_offers_the_whole_protocol(name):
    cls = runtime_class(name)
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


# A whole runtime, as a user or a later issue adds one: this module and nothing else (no registry line, no CLI or
# harness change). It "runs" a text file of digits: the next token is the last one plus one.
COUNTING_RUNTIME = """
from pathlib import Path

import numpy as np

from runtimes import Generation, RuntimeSpec, decode_loop

VOCAB = 10


class CountingRuntime:
    name = "counting"
    label = "counting (test runtime)"

    def __init__(self, path):
        self.path = Path(path)

    def logits(self, token_ids):
        return np.stack([np.eye(VOCAB, dtype=np.float32)[(t + 1) % VOCAB] for t in token_ids])

    def generate(self, token_ids, max_new_tokens, sampler, stop_ids=(), on_token=None):
        step = lambda token: self.logits([token])[0]
        out, stopped = decode_loop(sampler(step(token_ids[-1])), step, sampler, max_new_tokens, stop_ids, on_token)
        return Generation(out, 0.0, 0.0, len(token_ids), stopped)

    def prompt_ids(self, text):
        return [int(c) for c in text if c.isdigit()]

    def chat_ids(self, messages):
        return self.prompt_ids(messages[-1]["content"]), []

    def detokenize(self, ids):
        return "".join(map(str, ids))


def load(artifact, threads=None, device="cpu", ctx=None, verbose=False, **_):
    return CountingRuntime(artifact)


SPECS = (RuntimeSpec("counting", "counts (a test runtime)", "runtimes.counting", None,
                     lambda artifact: str(artifact).endswith(".count"), describe=lambda artifact: "count"),)
"""


def test_a_new_runtime_is_one_module(tmp_path):
    """Copy the product, add runtimes/counting.py, and `generate` and the registry use it unchanged."""
    import shutil

    for pkg in ("toolkit", "exporters", "quant", "runtimes"):
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "runtimes" / "counting.py").write_text(COUNTING_RUNTIME)
    artifact = tmp_path / "model.count"
    artifact.write_text("")
    env = {"PYTHONPATH": str(tmp_path)}
    proc = run_cli("generate", artifact, "--prompt", "3", "-n", "4", env=env,
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "34567", proc.stdout  # the prompt, then four counted tokens
    proc = run_cli("generate", artifact, "--prompt", "3", "-n", "2", "--runtime", "counting", env=env,
                   cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "345", proc.stderr[-2000:]
    # and the product itself does not have it
    assert "counting" not in RUNTIMES


# --- the exporters' self-checks call only what a protocol declares -------------------------------------------------
PROTOCOLS = {"Runtime": Runtime, **{p.__name__: p for p in runtimes.CAPABILITIES}}


def declared_methods(protocol) -> set[str]:
    return {name for name, _ in inspect.getmembers(protocol, inspect.isfunction) if not name.startswith("_")}


def undeclared_runtime_calls(source: str) -> list[str]:
    """Calls on a runtime that its annotation's protocol does not declare; runtimes loaded into a name without one."""
    import ast

    bad = []
    for fn in [n for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
        typed = {a.arg: a.annotation.id for a in fn.args.args + fn.args.kwonlyargs
                 if isinstance(a.annotation, ast.Name) and a.annotation.id in PROTOCOLS}
        for node in ast.walk(fn):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(node.annotation, ast.Name) and node.annotation.id in PROTOCOLS:
                typed[node.target.id] = node.annotation.id
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                    and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "load" \
                    and "RUNTIMES" in ast.unparse(node.value.func):
                bad.append(f"{fn.name}: a runtime loaded into {ast.unparse(node.targets[0])} without a protocol")
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in typed:
                protocol = typed[node.func.value.id]
                allowed = declared_methods(PROTOCOLS[protocol]) | {"label", "name"}
                if node.func.attr not in allowed:
                    bad.append(f"{fn.name}: {node.func.value.id}.{node.func.attr}() is not declared by {protocol}")
    return bad


def test_exporters_call_only_declared_runtime_methods():
    found = {str(path.relative_to(ROOT)): undeclared_runtime_calls(path.read_text())
             for path in (ROOT / "exporters").rglob("*.py")}
    assert {k: v for k, v in found.items() if v} == {}
    # and the check sees a call the protocol lacks, and a runtime loaded without naming one
    planted = ("def verify(folder):\n    runtime: Stepping = RUNTIMES['mnn'].load(folder)\n    runtime.reset()\n"
               "    runtime.embeddings()\n    other = RUNTIMES['mnn'].load(folder)\n")
    assert len(undeclared_runtime_calls(planted)) == 2


@pytest.mark.parametrize("name, capability", [("mnn", "Stepping"), ("onnxruntime", "Batching")])
def test_the_runtimes_exporters_drive_offer_the_capability(name, capability):
    protocol, cls = PROTOCOLS[capability], runtime_class(name)
    for method in declared_methods(protocol):
        want = list(inspect.signature(getattr(protocol, method)).parameters)
        got = list(inspect.signature(getattr(cls, method)).parameters)
        assert got[:len(want)] == want, (cls.__name__, method, got)

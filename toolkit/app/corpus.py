"""The embedded default corpus: docstrings of the Python standard library that ships with the interpreter.

No download, deterministic (sorted files, source order within a file), a few seconds to build. Test suites, IDLE,
tkinter, lib2to3 and similar corners are skipped; what remains is roughly 1 MB of English prose about programming.
"""
from __future__ import annotations

import ast
import functools
import sysconfig
from pathlib import Path

from toolkit.core.errors import ToolkitError

SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
             "dist-packages", "__pycache__", "pydoc_data", "config-3", "venv", "msilib", "encodings"}
MIN_DOC_CHARS = 80  # one-liners ("Return self.") teach little and repeat a lot


def _docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                docs.append(doc)
    return docs


@functools.lru_cache(maxsize=1)
def default_corpus_documents() -> tuple[str, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py")
                   if not SKIP_DIRS.intersection(part.split("-")[0] if part.startswith("config-") else part
                                                 for part in p.relative_to(stdlib).parts[:-1]))
    docs: list[str] = []
    seen: set[str] = set()
    for f in files:
        try:
            source = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for doc in _docstrings(source):
            if doc not in seen:  # the same docstring is inherited/copied across modules
                seen.add(doc)
                docs.append(doc)
    if not docs:
        raise ToolkitError(f"no docstrings found under {stdlib}", "pass --text FILE to train on your own text")
    return tuple(docs)


def default_corpus() -> str:
    return "\n\n".join(default_corpus_documents()) + "\n"

"""The house's floors, read from the import graph: every import of the product's code (module level and the lazy ones
inside functions alike) runs down the floors, never up or sideways, and no two modules import each other.

Floors, bottom up (README, "Layout"):
  0 core       toolkit/core        the architecture table, bundle, reference model, errors, tokenizers, verifier
  1 loaders    toolkit/checkpoints checkpoint formats -> ModelBundle
  2 runtimes   runtimes/           engines that run artifacts (the torch runtime loads checkpoints)
  3 quant | exporters              siblings: neither imports the other
  4 app        toolkit/app         the CLI, quickstart, train, parity (and toolkit/__main__)
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolkit", "exporters", "quant", "runtimes")
FLOORS = (("toolkit.core", 0), ("toolkit.checkpoints", 1), ("runtimes", 2), ("quant", 3), ("exporters", 3),
          ("toolkit.app", 4), ("toolkit.__main__", 4), ("toolkit", 4))


def modules(root: Path) -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (root / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> the product's modules it imports anywhere in its text."""
    mods = modules(root)

    def known(name: str) -> str | None:
        while name not in mods and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in mods else None

    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {d for d in map(known, names) if d and d != mod}
        graph[mod] = deps
    return graph


def floor(mod: str) -> tuple[int, str]:
    for prefix, level in FLOORS:
        if mod == prefix or mod.startswith(prefix + "."):
            return level, prefix
    raise AssertionError(f"{mod} is on no floor: add its folder to FLOORS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        level, home = floor(mod)
        for dep in sorted(deps):
            dep_level, dep_home = floor(dep)
            if dep_level > level or (dep_level == level and dep_home != home and level != 4):
                bad.append(f"{mod} (floor {level}) imports {dep} (floor {dep_level})")
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_import_runs_down_the_floors():
    graph = imports(ROOT)
    assert len(graph) > 60 and sum(map(len, graph.values())) > 200  # the whole product was read
    assert upward_imports(graph) == []


def test_no_two_modules_import_each_other():
    assert cycles(imports(ROOT)) == []


def test_the_core_imports_no_third_floor_package_by_name():
    # what the core must never need: an engine, an exporter or the app (torch, numpy, tokenizers are fine)
    for mod, path in modules(ROOT).items():
        if floor(mod)[0] == 0:
            text = path.read_text()
            for engine in ("llama_cpp", "onnxruntime", "MNN", "typer", "rich"):
                assert f"import {engine}" not in text, f"{mod} imports {engine}"


@pytest.mark.parametrize("planted, target", [
    ("toolkit/core/_planted.py", "from toolkit.app.cli import app"),          # core -> app, lazily
    ("toolkit/checkpoints/_planted.py", "import runtimes"),                    # loaders -> runtimes
    ("quant/_planted.py", "from exporters.onnx import MODEL_FILE"),           # sibling -> sibling
    ("exporters/_planted.py", "import quant.gptq"),                           # sibling -> sibling
    ("runtimes/_planted.py", "from toolkit.app import parity"),               # runtimes -> app
])
def test_a_planted_upward_import_is_caught(tmp_path, planted, target):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / planted).write_text(f"def later():\n    {target}\n")
    bad = upward_imports(imports(tmp_path))
    assert len(bad) == 1 and "_planted" in bad[0]


def test_a_planted_cycle_is_caught(tmp_path):
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    errors = tmp_path / "toolkit/core/errors.py"
    errors.write_text(errors.read_text() + "\n\ndef later():\n    from toolkit.core import verify\n")
    assert any("toolkit.core.errors" in c and "toolkit.core.verify" in c for c in cycles(imports(tmp_path)))

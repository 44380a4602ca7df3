"""Go's text/template as Ollama runs it: builds ollama_render.go (standard library only, offline) once into the cache
and renders TEMPLATEs on conversations in one process per batch. Used by `modelfile validate` and by the tests, where
it is the oracle: Ollama itself is a Go program rendering with exactly this package."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

SOURCE = Path(__file__).with_name("ollama_render.go")
CACHE = Path(os.environ.get("EDGE_TOOLKIT_CACHE", Path.home() / ".cache" / "edge-toolkit")) / "ollama-render"
# never reach the module proxy or download a toolchain: the program needs nothing beyond Go's standard library
GO_ENV = {"GOPROXY": "off", "GOTOOLCHAIN": "local", "GOFLAGS": "", "GO111MODULE": "on", "CGO_ENABLED": "0"}


class GoUnavailable(RuntimeError):
    """No Go toolchain on PATH, or it could not build the renderer."""


@dataclass
class Case:
    """One render: a conversation, the Modelfile's SYSTEM, and Ollama's think flag (None = not set)."""
    messages: list[dict]
    system: str = ""
    think: bool | None = None
    tools: list[dict] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"messages": self.messages, "system": self.system, "think": self.think, "tools": self.tools}


@dataclass
class Rendered:
    parse_error: str | None
    parse_line: int | None  # the template's own line of a parse error
    thinking: bool  # Ollama would offer thinking for this template (and default think to true)
    tools: bool  # the template names .Tools: Ollama would offer tool calling
    prompts: list[str | None]  # None where executing the template failed
    errors: list[str | None]


def go_version() -> str | None:
    go = shutil.which("go")
    if go is None:
        return None
    try:
        return subprocess.run([go, "version"], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **GO_ENV}).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def renderer() -> Path:
    """The built renderer, keyed by its source and the Go version (built on first use, atomically)."""
    version = go_version()
    if version is None:
        raise GoUnavailable("Go is not installed")
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode()).hexdigest()[:16]
    binary = CACHE / key / "ollama-render"
    if binary.is_file():
        return binary
    binary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=binary.parent) as tmp:
        main = Path(tmp) / "main.go"
        shutil.copyfile(SOURCE, main)
        built = Path(tmp) / "ollama-render"
        proc = subprocess.run(["go", "build", "-o", str(built), str(main)], cwd=tmp, capture_output=True, text=True,
                              timeout=600, env={**os.environ, **GO_ENV})
        if proc.returncode != 0:
            raise GoUnavailable(f"go build failed: {proc.stderr.strip()[-500:]}")
        os.replace(built, binary)  # concurrent builders race harmlessly: the last rename wins with identical bytes
    return binary


def render(jobs: list[tuple[str, list[Case]]]) -> list[Rendered]:
    """Render each (template, cases) job with Go; one process for the whole batch."""
    payload = {"jobs": [{"template": t, "cases": [c.as_json() for c in cases]} for t, cases in jobs]}
    proc = subprocess.run([str(renderer())], input=json.dumps(payload), capture_output=True, text=True,
                          timeout=300, encoding="utf-8")
    if proc.returncode != 0:
        raise GoUnavailable(f"the Go renderer failed: {proc.stderr.strip()[-500:]}")
    out = []
    for j in json.loads(proc.stdout)["jobs"]:
        results = j.get("results") or []
        out.append(Rendered(j.get("parse_error") or None, j.get("parse_line") or None, bool(j.get("thinking")),
                            bool(j.get("tools")),
                            [None if r.get("error") else r["prompt"] for r in results],
                            [r.get("error") or None for r in results]))
    return out

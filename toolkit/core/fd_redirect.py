"""Point a C-level file descriptor somewhere else for a while: engines written in C/C++ (llama.cpp, MNN) print to
fd 1/2 directly, past Python's sys.stdout/sys.stderr."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def redirected(fd: int, target: int | None = None) -> Iterator[None]:
    """While inside, writes to `fd` go to the open descriptor `target` (default: /dev/null)."""
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY) if target is None else None
    try:
        os.dup2(devnull if target is None else target, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        if devnull is not None:
            os.close(devnull)

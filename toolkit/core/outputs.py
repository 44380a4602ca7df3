"""Writing outputs the CLI contract's way: refuse an existing destination unless --force, write to
`<dest>.partial-<pid>` beside it, and rename into place only when everything (verification included) succeeded.
A failure removes the partial; a killed process may leave a `.partial-*`, never a file or folder at the destination.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from toolkit.core.errors import ToolkitError


def check_destination(dest: str | Path, force: bool) -> Path:
    """Validate before any expensive work: parent must be (or become) a directory, dest absent unless force."""
    dest = Path(dest)
    for parent in [dest.parent, *dest.parent.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise ToolkitError(f"cannot write {dest}: {parent} is a file, not a directory",
                                   "choose an output path inside a directory")
            if not os.access(parent, os.W_OK):
                raise ToolkitError(f"cannot write {dest}: {parent} is not writable", "choose another output path")
            break
    if dest.exists() and not force:
        raise ToolkitError(f"{dest} already exists", "pass --force to replace it, or choose another -o path")
    return dest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_output(dest: str | Path, force: bool = False, directory: bool = False) -> Iterator[Path]:
    """Yield a partial path to write; on success it replaces dest, on any exception it is removed."""
    dest = check_destination(dest, force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    _remove(partial)
    if directory:
        partial.mkdir()
    try:
        yield partial
        if dest.exists():
            old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            os.replace(partial, dest)
            _remove(old)
        else:
            os.replace(partial, dest)
    except BaseException:
        _remove(partial)
        raise

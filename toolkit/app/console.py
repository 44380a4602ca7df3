"""The CLI's two consoles (stdout for results, stderr for everything else) and the flags read off the whole line."""
from __future__ import annotations

from rich.console import Console

err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


class Flags:
    debug = False  # --debug: tracebacks
    verbose = False  # --verbose: engines' own logs

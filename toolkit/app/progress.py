"""Rich progress bars for long work (training steps, per-layer loops), drawn on stderr."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def step_progress(console: Console, total: int, enabled: bool = True,
                  description: str = "train") -> Iterator[Callable[[dict[str, Any]], None]]:
    """Yield a callback taking {'step', 'loss', 'tok_per_s', 'heldout_ppl'?} records."""
    if not enabled:
        yield lambda record: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TextColumn("held-out ppl {task.fields[ppl]}"),
               TextColumn("{task.fields[tps]} tok/s"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total, loss="-", ppl="-", tps="-")

        def update(record: dict[str, Any]) -> None:
            fields = {"loss": f"{record['loss']:.3f}", "tps": f"{record['tok_per_s']:,.0f}"}
            if "heldout_ppl" in record:
                fields["ppl"] = f"{record['heldout_ppl']:.2f}"
            bar.update(task, completed=record["step"], **fields)

        yield update


@contextlib.contextmanager
def count_progress(console: Console, description: str) -> Iterator[Callable[[int, int], None]]:
    """A plain bar for counted work; the callback takes (done, total). Where stderr is no terminal (a CI log, a
    pipe) a bar draws nothing until the end, so a line is printed at each tenth of the work instead."""
    if not console.is_terminal:
        start, said = time.perf_counter(), [-1]

        def line(done: int, total: int) -> None:
            tenth = 10 * done // max(total, 1)
            if tenth != said[0]:
                said[0] = tenth
                console.print(f"{description}: {done}/{total} ({time.perf_counter() - start:.0f} s)",
                              highlight=False)

        yield line
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)

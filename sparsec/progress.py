"""Progress of the steps that can take minutes (calibration, approximation, verification).

A library prints nothing of its own, so by default this is silent; an entry that talks to a
person (the command line) turns it on with ``shown(console)`` and gets one live line per running
step on stderr: its name, a bar where the amount of work is known, and the time spent.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

_PROGRESS = contextvars.ContextVar("sparsec_progress", default=None)


@contextlib.contextmanager
def shown(console) -> Iterator[None]:
    """Show the progress of every step run inside the block on ``console`` (a rich Console)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)
    with progress:
        token = _PROGRESS.set(progress)
        try:
            yield
        finally:
            _PROGRESS.reset(token)


@contextlib.contextmanager
def task(description: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
    """A line for one piece of work while it runs; yields ``advance(n=1)`` (a no-op when not shown)."""
    progress = _PROGRESS.get()
    if progress is None:
        yield lambda n=1: None
        return
    tid = progress.add_task(description, total=total)
    try:
        yield lambda n=1: progress.advance(tid, n)
    finally:
        progress.remove_task(tid)


def advance_current(n: int = 1) -> None:
    """Advance the innermost running task (work counted deep inside a step, e.g. model evaluations)."""
    progress = _PROGRESS.get()
    if progress is not None and progress.task_ids:
        progress.advance(progress.task_ids[-1], n)

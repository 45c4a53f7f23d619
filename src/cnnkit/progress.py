"""The one place cnnkit's rich progress bars are built: decoding images, downloads, training steps.

Each kind of work had its own copy of the column list and console choice; one helper keeps the bars
looking alike and gives the three callers (a context manager for counted work, pooch's bar protocol for
downloads, a Progress for the training loop) the same construction. Imports only rich and the standard
library, never torch: a download or a cached dataset load must not pay for importing it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

__all__ = ["KINDS", "PoochProgress", "make_progress", "progress_bar"]

KINDS = ("count", "bytes", "steps")


def make_progress(kind: str, *, console: Console | None = None, transient: bool = True) -> Progress:
    """A rich Progress (not started) with the columns for `kind`.

    "count": items done out of a total (decoding images); "bytes": a download's size, speed and time
    left; "steps": training steps with elapsed time and a `stats` text field (add tasks with `stats=""`).
    Without `console`, bars go to stderr so they never mix with a command's results on stdout.
    """
    return Progress(*_columns(kind), console=console or Console(stderr=True), transient=transient)


def _columns(kind: str) -> tuple[ProgressColumn, ...]:
    """The description and bar every kind shares, then the kind's own measures."""
    shared = (TextColumn("[bold]{task.description}"), BarColumn())
    if kind == "count":
        return (*shared, MofNCompleteColumn(), TimeRemainingColumn())
    if kind == "bytes":
        return (*shared, DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    if kind == "steps":
        return (*shared, MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"))  # fmt: skip
    raise ValueError(f"unknown progress kind {kind!r}; expected one of {', '.join(KINDS)}")


@contextlib.contextmanager
def progress_bar(
    label: str,
    total: int | None,
    *,
    enabled: bool,
    kind: str = "count",
    console: Console | None = None,
) -> Iterator[Callable[[int], None]]:
    """A transient progress bar while the block runs when `enabled`, else nothing; yields `advance(n)`.

    The disabled case still yields a callable so the caller's loop has no branch for it.
    """
    if not enabled:
        yield lambda amount: None
        return
    progress = make_progress(kind, console=console)
    task = progress.add_task(label, total=total)
    with progress:
        yield lambda amount: progress.advance(task, amount)


class PoochProgress:
    """The progress-bar protocol pooch's downloaders expect (total, update, reset, close), drawn with rich.

    Started on creation, as pooch starts updating it straight away. Not transient: the finished bar stays
    as a record of what was downloaded.
    """

    def __init__(self, description: str, *, console: Console | None = None) -> None:
        self._progress = make_progress("bytes", console=console, transient=False)
        self._task: TaskID = self._progress.add_task(description, total=None)
        self._total: int | None = None
        self._closed = False
        self._progress.start()

    @property
    def total(self) -> int | None:
        return self._total

    @total.setter
    def total(self, value: int | None) -> None:
        self._total = value or None  # pooch sends 0 when the server gave no Content-Length
        self._progress.update(self._task, total=self._total)

    def update(self, amount: int) -> None:
        self._progress.advance(self._task, amount)

    def reset(self) -> None:
        self._progress.reset(self._task, total=self._total)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._progress.stop()

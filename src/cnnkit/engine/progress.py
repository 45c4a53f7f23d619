"""The rich progress bar inside an epoch and the one summary line after it.

The bar's loss/accuracy text needs a device sync, so it is refreshed at most a few times a second,
never per step; on a non-terminal (CI, pipes) the bar is not drawn and only the summary lines print.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

REFRESH_SECONDS = 0.25


class EpochProgress:
    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(stderr=False)
        self.progress: Progress | None = None
        self.task = None
        self._last_refresh = 0.0
        self._pending = 0

    def __enter__(self) -> EpochProgress:
        if self.enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
                console=self.console, transient=True,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.progress is None:
            return
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(f"Epoch {epoch}/{epochs}", total=steps, stats="")
        self._pending = 0

    def advance(self, stats: Callable[[], tuple[float, float]]) -> None:
        """Count one step; every REFRESH_SECONDS, pull (loss, accuracy) and redraw."""
        if self.progress is None:
            return
        self._pending += 1
        now = time.monotonic()
        if now - self._last_refresh >= REFRESH_SECONDS:
            loss, accuracy = stats()
            self.progress.update(self.task, advance=self._pending, stats=f"loss {loss:.4f}  acc {accuracy:.4f}")
            self._pending = 0
            self._last_refresh = now

    def end_epoch(self, epoch: int, epochs: int, history) -> None:
        if not self.enabled:
            return
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)  # the summary line replaces the finished bar
            self.task = None
        h = history.history
        self.console.print(
            f"Epoch {epoch}/{epochs}  loss {h['loss'][-1]:.4f}  accuracy {h['accuracy'][-1]:.4f}  "
            f"val_loss {h['val_loss'][-1]:.4f}  val_accuracy {h['val_accuracy'][-1]:.4f}  "
            f"lr {h['lr'][-1]:.2e}  {h['seconds'][-1]:.1f}s",
            highlight=False, soft_wrap=True,
        )

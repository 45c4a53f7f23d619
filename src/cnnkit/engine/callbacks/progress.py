"""The progress bar inside an epoch and the one summary line after it, as a callback.

The bar's loss/accuracy text needs a device sync, so it is refreshed at most every REFRESH_SECONDS, never
per step; on a non-terminal (CI, pipes) no bar is drawn and only the summary lines print. The summary line
prints every key of the logs, so values added by other callbacks (EMA's) show up without a change here.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console

from cnnkit.engine.callbacks.base import Callback, Phase
from cnnkit.progress import make_progress

REFRESH_SECONDS = 0.25


def format_logs(logs: Mapping[str, Any]) -> str:
    """'loss 0.1234  val_accuracy 0.9876  lr 1.00e-03  4.2s' in the logs' own order."""
    parts = []
    for key, value in logs.items():
        if key == "seconds":
            continue
        parts.append(f"{key} {value:.2e}" if key == "lr" else f"{key} {value:.4f}")
    if "seconds" in logs:
        parts.append(f"{logs['seconds']:.1f}s")
    return "  ".join(parts)


class ProgressBar(Callback):
    order = Phase.REPORT  # last: prints the logs once History has timed the epoch

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress = None
        self.task = None
        self._last_refresh = 0.0
        self._pending = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.progress = make_progress("steps", console=self.console)
        self.progress.start()

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.task = self.progress.add_task(f"Epoch {epoch}/{self.state.epochs}", total=self.state.steps_per_epoch,
                                           stats="")
        self._pending = 0

    def on_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None:
        self._pending += 1
        now = time.monotonic()
        if now - self._last_refresh >= REFRESH_SECONDS:
            stats = f"loss {logs['loss']:.4f}  acc {logs['accuracy']:.4f}" if logs else ""
            self.progress.update(self.task, advance=self._pending, stats=stats)
            self._pending = 0
            self._last_refresh = now

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        self.progress.remove_task(self.task)  # the summary line replaces the finished bar
        self.task = None
        self.console.print(f"Epoch {epoch}/{self.state.epochs}  {format_logs(logs)}", highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

"""`cnnkit compare`: several runs side by side, as a table of what each was and how it did, and one figure.

The table's facts come from `runs.summarize_run` (the same reading `cnnkit runs` does, so a broken run
shows what could be read); the best validation accuracy and the curves come from each run's history.csv.
A run without a readable history.csv stays in the table and is left out of the figure, with a note saying
why. The module is `comparison` (not `compare`) so that `cnnkit.compare`, the function, is never shadowed
by a submodule of the same name.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError
from cnnkit.fileio import UnreadableFile, expand_user_path, output_path
from cnnkit.records import read_history_table
from cnnkit.runs import RunSummary, resolve_run_dir, summarize_run

DEFAULT_OUT = "compare.png"


@dataclass
class ComparedRun:
    """One row of `cnnkit compare`: the run's summary, its per-epoch history and whether it was plotted."""

    summary: RunSummary
    label: str  # the run's name in the table and the figure's legend (its path where two names clash)
    history: dict[str, list[float]] | None  # history.csv's columns ("epoch" among them); None when unreadable
    note: str | None = None  # why the run is not in the figure, or None

    @property
    def name(self) -> str:
        return self.summary.name

    @property
    def plotted(self) -> bool:
        return self.note is None

    @property
    def best_val_epoch(self) -> int | None:
        """The epoch with the highest validation accuracy (the earliest on a tie), or None without history."""
        index = self._best_index()
        return None if index is None else int(self.history["epoch"][index])

    @property
    def best_val_accuracy(self) -> float | None:
        index = self._best_index()
        return None if index is None else self.history["val_accuracy"][index]

    def _best_index(self) -> int | None:
        values = (self.history or {}).get("val_accuracy", [])
        finite = [(value, -i) for i, value in enumerate(values) if math.isfinite(value)]
        return -max(finite)[1] if finite else None

    def to_dict(self) -> dict[str, Any]:
        return {**self.summary.to_dict(), "label": self.label, "best_val_accuracy": self.best_val_accuracy,
                "best_val_epoch": self.best_val_epoch, "plotted": self.plotted, "note": self.note}


def compare(runs: str | Path | Iterable[str | Path], out: str | Path | None = None) -> list[ComparedRun]:
    """Read each run's summary and history; with `out`, write one PNG overlaying their validation curves.

    `runs` is one run directory or several, in the order the table lists them. Every path must be a run
    directory (or its model.json): a path that is not is a CnnkitError naming it, before anything is
    written. `out` (a .png file) is written atomically, and only when at least one run has a history to
    draw; `row.plotted` and `row.note` say which runs it shows.
    """
    runs = [runs] if isinstance(runs, (str, Path)) else list(runs)
    if not runs:
        raise CnnkitError("compare needs a list of one or more run directories")
    run_dirs = [resolve_run_dir(path) for path in runs]
    out_path = _check_out(out) if out is not None else None
    summaries = [summarize_run(run_dir.resolve()) for run_dir in run_dirs]  # resolved: `.` has a name
    labels = _labels([Path(path) for path in runs], [summary.name for summary in summaries])
    rows = [ComparedRun(summary, label, *read_history(run_dir))
            for run_dir, summary, label in zip(run_dirs, summaries, labels)]
    plotted = {row.label: row.history for row in rows if row.plotted}
    if out_path is not None and plotted:
        from cnnkit.plots import plot_comparison

        title = f"Validation curves: {', '.join(plotted)}"
        try:
            plot_comparison(plotted, out_path, title=title)
        except OSError as error:
            raise CnnkitError(f"{out_path}: cannot write ({error.strerror or error})") from None
    return rows


def read_history(run_dir: Path) -> tuple[dict[str, list[float]] | None, str | None]:
    """(history.csv's columns with "epoch", None), or (None, why the run cannot be plotted)."""
    path = run_dir / "history.csv"
    try:
        table = read_history_table(path)
    except FileNotFoundError:
        return None, "no history.csv"
    except UnreadableFile as error:
        return None, str(error).removeprefix(f"{path}: ").join(("history.csv: ", ""))
    except OSError as error:
        return None, f"history.csv is not readable ({error.strerror or error})"
    nan = float("nan")
    columns = {name: [nan if value is None else value for value in table.column(name)] for name in table.columns}
    if not table.rows or not any(math.isfinite(value) for value in columns.get("val_accuracy", [])):
        return columns, "history.csv has no val_accuracy values"
    return columns, None


def _check_out(out: str | Path) -> Path:
    path = expand_user_path(out, "--out")
    if path.suffix.lower() != ".png":
        raise CnnkitError(f"{path}: the comparison figure is a PNG; give a file name ending in .png")
    if path.is_dir():
        raise CnnkitError(f"{path}: is a folder; give a file name such as {path / DEFAULT_OUT}")
    return output_path(path, "--out")


def _labels(typed: list[Path], names: list[str]) -> list[str]:
    """Run names, or the paths as typed where two runs share a name (runs/a/train and runs/b/train)."""
    labels = [str(path) if names.count(name) > 1 else name for path, name in zip(typed, names)]
    return [label if labels.count(label) == 1 else f"{label} #{labels[:i + 1].count(label)}"
            for i, label in enumerate(labels)]

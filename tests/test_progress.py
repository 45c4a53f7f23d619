"""The shared rich progress helper, drawn to a captured terminal."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from rich.progress import DownloadColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

from cnnkit.progress import PoochProgress, make_progress, progress_bar


def _terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=100), buffer


def test_disabled_bar_draws_nothing() -> None:
    console, buffer = _terminal()
    with progress_bar("Decoding images", 5, enabled=False, console=console) as advance:
        advance(3)
    assert buffer.getvalue() == ""


def test_enabled_bar_draws_label_and_count() -> None:
    console, buffer = _terminal()
    with progress_bar("Decoding images", 5, enabled=True, console=console) as advance:
        advance(3)
    drawn = buffer.getvalue()
    assert "Decoding images" in drawn and "3/5" in drawn
    assert drawn.endswith("\x1b[2K")  # transient: the bar erases itself when done


def test_kinds_have_their_columns() -> None:
    def column_types(kind: str) -> set[type]:
        return {type(column) for column in make_progress(kind).columns}

    assert MofNCompleteColumn in column_types("count") and DownloadColumn not in column_types("count")
    assert DownloadColumn in column_types("bytes") and MofNCompleteColumn not in column_types("bytes")
    assert {MofNCompleteColumn, TimeElapsedColumn} <= column_types("steps")
    with pytest.raises(ValueError, match="unknown progress kind"):
        make_progress("percent")


def test_steps_bar_shows_the_stats_field() -> None:
    console, buffer = _terminal()
    progress = make_progress("steps", console=console)
    assert isinstance(progress.columns[-1], TextColumn)
    with progress:
        task = progress.add_task("Epoch 1/2", total=10, stats="")
        progress.update(task, advance=4, stats="loss 0.1234")
    assert "Epoch 1/2" in buffer.getvalue() and "loss 0.1234" in buffer.getvalue()


def test_pooch_progress_protocol() -> None:
    console, buffer = _terminal()
    bar = PoochProgress("train-images.gz", console=console)
    bar.total = 0  # pooch's "no Content-Length"
    assert bar.total is None
    bar.total = 4096
    bar.update(1024)
    bar.update(1024)
    assert bar.total == 4096 and bar._progress.tasks[0].completed == 2048
    bar.reset()
    assert bar._progress.tasks[0].completed == 0 and bar._progress.tasks[0].total == 4096
    bar.update(4096)
    bar.close()
    bar.close()  # pooch and the caller's `finally` may both close it
    drawn = buffer.getvalue()
    assert "train-images.gz" in drawn and "4.1 kB" in drawn

"""`cnnkit compare` on two real small runs, and `--tensorboard` read back with TensorBoard's own reader."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnkit
from cnnkit import comparison
from cnnkit.errors import CnnkitError
from cnnkit.plots import plot_comparison
from processes import run_cnnkit
from slices import SHARED_DATA

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def cnnkit_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("CNNKIT_DATA", "CNNKIT_MIRROR")}
    env.update(COLUMNS="200", CNNKIT_MIRROR="http://127.0.0.1:9")  # never the internet, whatever happens
    return run_cnnkit(*args, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two real trainings: `zeta` (the tutorial's model, 1 epoch) and `alpha` (preset fast, 2 epochs, TensorBoard)."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    from cnnkit.api import train

    runs = tmp_path_factory.mktemp("runs")
    common = dict(dataset="mnist", data_dir=str(SHARED_DATA), limit_train=1000, limit_eval=300, threads=1,
                  runs_dir=str(runs), progress=False, log=lambda *args: None)
    train(name="zeta", epochs=1, **common)
    train(name="alpha", preset="fast", epochs=2, tensorboard=True, **common)
    return runs


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _history(run: Path) -> dict[str, list[float]]:
    rows = list(csv.DictReader((run / "history.csv").open()))
    return {key: [float(row[key]) for row in rows] for key in rows[0]}


def _rows(stdout: str) -> dict[str, list[str]]:
    """The table's body rows as {run: [cells after the run name]}."""
    cells = [[cell.strip() for cell in line.strip("│ ").split("│")] for line in stdout.splitlines()
             if line.startswith("│")]
    return {row[0]: row[1:] for row in cells}


def _best(run: Path) -> str:
    values = _history(run)["val_accuracy"]
    best = max(values)
    return f"{best:.4f} (epoch {values.index(best) + 1})"


def test_table_and_figure_of_two_real_runs(runs, tmp_path):
    out = tmp_path / "figures" / "both.png"
    result = cnnkit_cli("compare", str(runs / "zeta"), str(runs / "alpha"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert list(rows) == ["zeta", "alpha"]  # in the order given
    for name, preset, epochs in (("zeta", "-", "1"), ("alpha", "fast", "2")):
        metrics = _metrics(runs / name)
        dataset, model, shown_preset, shown_epochs, train_time, best, test = rows[name]
        assert (dataset, model, shown_preset, shown_epochs) == ("mnist", metrics["model"], preset, epochs)
        assert test == f"{metrics['test_accuracy']:.4f}"
        assert best == _best(runs / name)
        assert train_time == f"{metrics['train_seconds']:.1f}s"
    assert rows["alpha"][1] == "fast" and rows["zeta"][1] == "seed"
    assert result.stdout.strip().splitlines()[-1] == f"validation curves of 2 runs: {out}"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    with Image.open(out) as image:
        image.verify()
    assert [path.name for path in out.parent.iterdir()] == ["both.png"]  # written atomically: no temporary left


def test_python_api_returns_the_rows_and_the_figure_draws_one_line_per_run(runs, tmp_path):
    out = tmp_path / "api.png"
    assert cnnkit.compare is comparison.compare
    rows = cnnkit.compare([runs / "alpha", runs / "zeta"], out=out)
    assert [row.name for row in rows] == ["alpha", "zeta"] and all(row.plotted for row in rows)
    for row in rows:
        history = _history(runs / row.name)
        assert row.best_val_accuracy == max(history["val_accuracy"])
        assert row.summary.test_accuracy == _metrics(runs / row.name)["test_accuracy"]
        assert row.history["val_accuracy"] == history["val_accuracy"]
        assert row.to_dict()["best_val_epoch"] == row.best_val_epoch
    assert rows[0].summary.preset == "fast" and rows[1].summary.preset is None
    assert out.read_bytes().startswith(PNG_SIGNATURE)

    figure = plot_comparison({row.label: row.history for row in rows}, tmp_path / "again.png")
    accuracy, loss = figure.axes[:2]
    for ax, metric in ((accuracy, "val_accuracy"), (loss, "val_loss")):
        lines = [line for line in ax.get_lines() if str(line.get_gid()).startswith(f"compare-{metric}-")]
        assert [line.get_label() for line in lines] == ["alpha", "zeta"]
        for line, row in zip(lines, rows):
            assert list(line.get_xdata()) == row.history["epoch"]
            np.testing.assert_array_equal(line.get_ydata(), row.history[metric])
    assert [text.get_text() for text in figure.legends[0].get_texts()] == ["alpha", "zeta"]


def test_default_output_is_compare_png_beside_the_runs_it_compares(runs, tmp_path, monkeypatch):
    result = cnnkit_cli("compare", str(runs / "zeta"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (runs / "compare.png").read_bytes().startswith(PNG_SIGNATURE) and not (tmp_path / "compare.png").exists()
    assert result.stdout.strip().splitlines()[-1] == f"validation curves of 1 run: {runs / 'compare.png'}"
    (runs / "compare.png").unlink()  # the runs fixture is shared

    monkeypatch.chdir(tmp_path)
    rows = cnnkit.compare([runs / "zeta"])  # the Python API writes a figure only when asked to
    assert len(rows) == 1 and not any(p.name == "compare.png" for p in tmp_path.iterdir())
    assert [row.name for row in cnnkit.compare(runs / "zeta")] == ["zeta"]  # one path, or any iterable of them
    assert [row.name for row in cnnkit.compare(runs / name for name in ("alpha", "zeta"))] == ["alpha", "zeta"]


def test_a_run_without_history_is_shown_and_left_out_of_the_figure(runs, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(runs / "zeta", bare)
    (bare / "history.csv").unlink()
    out = tmp_path / "out.png"
    result = cnnkit_cli("compare", str(runs / "alpha"), str(bare), "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert rows["bare"][5] == "-" and rows["bare"][6] == f"{_metrics(bare)['test_accuracy']:.4f}"
    assert "bare: left out of the figure (no history.csv)" in result.stdout
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert [row.plotted for row in cnnkit.compare([runs / "alpha", bare])] == [True, False]

    alone = tmp_path / "alone.png"
    result = cnnkit_cli("compare", str(bare), "--out", str(alone))
    assert result.returncode == 0 and f"no run has validation history; {alone} not written" in result.stdout
    assert not alone.exists()


def test_two_runs_with_one_name_are_labelled_by_their_paths(runs, tmp_path):
    for folder in ("a", "b"):
        shutil.copytree(runs / "zeta", tmp_path / folder / "train")
    rows = cnnkit.compare([tmp_path / "a" / "train", tmp_path / "b" / "train"])
    assert [row.label for row in rows] == [str(tmp_path / "a" / "train"), str(tmp_path / "b" / "train")]


def test_bad_paths_are_one_line_errors_without_a_figure(runs, tmp_path):
    out = tmp_path / "never.png"
    for bad in (tmp_path / "missing", tmp_path):  # absent, and a folder that is not a run
        result = cnnkit_cli("compare", str(runs / "zeta"), str(bad), "--out", str(out))
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and str(bad) in result.stderr
        assert "not a cnnkit run directory" in result.stderr
        assert not out.exists()

    result = cnnkit_cli("compare", str(runs / "zeta"), "--out", str(tmp_path / "figure.jpg"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "ending in .png" in result.stderr
    result = cnnkit_cli("compare", str(runs / "zeta"), "--out", str(tmp_path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1

    result = cnnkit_cli("compare")
    assert result.returncode == 2 and "the following arguments are required: RUN" in result.stderr
    with pytest.raises(CnnkitError, match="one or more run"):
        cnnkit.compare([])
    with pytest.raises(CnnkitError, match="missing: not a cnnkit run directory"):
        cnnkit.compare([tmp_path / "missing"])


def test_tensorboard_scalars_equal_history_csv(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = runs / "alpha"
    assert not (runs / "zeta" / "tensorboard").exists()  # only when asked for
    assert not [p for p in runs.iterdir() if p.name.startswith(".")]  # written in staging, moved with the run
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    history = _history(run)
    epochs = [int(epoch) for epoch in history.pop("epoch")]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"} <= set(history)
    assert set(events.Tags()["scalars"]) == set(history)  # every key of every epoch's logs
    for key, values in history.items():
        scalars = events.Scalars(key)
        assert [event.step for event in scalars] == epochs == [1, 2]
        assert [event.value for event in scalars] == [float(np.float32(value)) for value in values], key


def test_tensorboard_missing_fails_first_with_the_install_command(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tensorboard"] = None  # as if the extra were not installed
        from cnnkit.engine.callbacks import TensorBoardLogger
        from cnnkit.errors import CnnkitError
        try:
            TensorBoardLogger({str(tmp_path / 'logs')!r})
        except CnnkitError as error:
            print("api:", error)
        from cnnkit.cli import main
        sys.exit(main(["train", "--tensorboard", "--runs-dir", {str(tmp_path / 'runs')!r}, "--data-dir", "/nowhere"]))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    hint = 'pip install "cnnkit[tensorboard]"'
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr == f"cnnkit: error: --tensorboard needs the tensorboard package, which is not installed: {hint}\n"
    assert result.stdout == f"api: TensorBoard logging needs the tensorboard package: {hint}\n"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "logs").exists()

"""`cnnkit runs DIR`: a table of real runs, newest first, that survives broken and half-written directories."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cnnkit.errors import CnnkitError
from cnnkit.runs import list_runs
from processes import run_cnnkit
from slices import SHARED_DATA


def cnnkit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("CNNKIT_DATA", "CNNKIT_MIRROR")}
    env.update(COLUMNS="200", CNNKIT_MIRROR="http://127.0.0.1:9")  # never the internet, whatever happens
    return run_cnnkit(*args, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two real small trainings, `zeta` first and `alpha` second (so newest-first is not name order)."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    runs = tmp_path_factory.mktemp("runs")
    for name, epochs in (("zeta", "1"), ("alpha", "2")):
        result = cnnkit("train", "--epochs", epochs, "--limit-train", "500", "--limit-eval", "200", "--data-dir",
                        str(SHARED_DATA), "--runs-dir", str(runs), "--name", name, "--quiet")
        assert result.returncode == 0, result.stderr
        time.sleep(0.05)  # distinct modification times even on coarse file systems
    return runs


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _rows(stdout: str) -> list[list[str]]:
    """The table's body rows as lists of cell texts."""
    return [[cell.strip() for cell in line.strip("│ ").split("│")] for line in stdout.splitlines()
            if line.startswith("│")]


def test_lists_real_runs_newest_first_with_their_accuracy(runs):
    result = cnnkit("runs", str(runs))
    assert result.returncode == 0, result.stderr
    rows = _rows(result.stdout)
    assert [row[0] for row in rows] == ["alpha", "zeta"]
    for row in rows:
        metrics = _metrics(runs / row[0])
        assert row[1:5] == ["mnist", "seed", str(metrics["epochs"]), f"{metrics['test_accuracy']:.4f}"]
        assert row[5].endswith("s") and row[6].startswith(time.strftime("%Y-"))
    assert [row[3] for row in rows] == ["2", "1"]
    assert "newest first" in result.stdout


def test_order_follows_the_run_dates_not_the_names(runs, tmp_path):
    now = time.time()
    os.utime(runs / "alpha" / "metrics.json", (now - 3600, now - 3600))  # alpha now finished an hour ago
    try:
        listed = list_runs(runs)
        assert [run.name for run in listed] == ["zeta", "alpha"]
        assert listed[0].date > listed[1].date
    finally:
        os.utime(runs / "alpha" / "metrics.json", (now + 1, now + 1))


def test_broken_and_staging_directories_do_not_crash_it(runs):
    broken = runs / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "metrics.json").write_text("{not json")
    staging = runs / ".x.partial-abc"
    staging.mkdir(exist_ok=True)
    (staging / "metrics.json").write_text(json.dumps({"test_accuracy": 0.5, "dataset": "mnist"}))
    (runs / "notes.txt").write_text("a file, not a run")
    try:
        result = cnnkit("runs", str(runs))
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        rows = {row[0]: row for row in _rows(result.stdout)}
        assert set(rows) == {"alpha", "zeta", "broken"}
        assert rows["broken"][1:6] == ["?"] * 5
        assert "broken: not a complete run (metrics.json is not valid JSON; no config.json; no model.json)" \
            in result.stdout
        assert ".x.partial" not in result.stdout and "notes.txt" not in result.stdout

        listed = {run.name: run for run in list_runs(runs)}
        assert listed["alpha"].problem is None and listed["broken"].test_accuracy is None
        items = json.loads(cnnkit("runs", str(runs), "--json").stdout)
        by_name = {item["name"]: item for item in items}
        assert by_name["zeta"]["test_accuracy"] == _metrics(runs / "zeta")["test_accuracy"]
        assert by_name["broken"]["problem"].startswith("metrics.json is not valid JSON")
    finally:
        for path in (broken / "metrics.json", staging / "metrics.json", runs / "notes.txt"):
            path.unlink()
        broken.rmdir()
        staging.rmdir()


def test_empty_and_missing_folders_are_one_line(tmp_path):
    result = cnnkit("runs", str(tmp_path))
    assert result.returncode == 0 and result.stdout == f"no runs in {tmp_path}\n"
    (tmp_path / ".train.partial-xyz").mkdir()  # only an unfinished training: still no runs
    assert cnnkit("runs", str(tmp_path)).stdout == f"no runs in {tmp_path}\n"

    result = cnnkit("runs", str(tmp_path / "nope"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "does not exist" in result.stderr
    assert not (tmp_path / "nope").exists()
    with pytest.raises(CnnkitError, match="does not exist"):
        list_runs(tmp_path / "nope")


def test_default_folder_is_runs_and_help_has_an_example(tmp_path):
    (tmp_path / "runs").mkdir()
    assert cnnkit("runs", cwd=tmp_path).stdout == "no runs in runs\n"
    help_text = cnnkit("runs", "--help").stdout
    assert "usage: cnnkit runs" in help_text and "example:" in help_text

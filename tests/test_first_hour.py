"""A new user's first hour, each item as a real `cnnkit` process: what went wrong silently now says so."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from checkpoints import wait_for_checkpoint
from processes import run_cnnkit, start_cnnkit
from slices import SHARED_DATA
from test_hostile_inputs import cnnkit, write_digit_pngs


def small_folder(root: Path, per_class: int = 12) -> Path:
    for label in range(3):
        write_digit_pngs(root / f"c{label}", per_class, seed=label)
    return root


def test_a_batch_larger_than_the_training_set_and_a_tiny_test_split_are_said_even_when_quiet(tmp_path):
    folder = small_folder(tmp_path / "folder")
    result = cnnkit("train", "--dataset", f"imagefolder:{folder}", "--batch-size", "2000", "--epochs", "1",
                    "--quiet", "--no-checkpoint", "--runs-dir", str(tmp_path / "runs"), "--data-dir",
                    str(tmp_path / "d"))
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("cnnkit: warning:")]
    assert any("--batch-size 2000 is more than the" in line and "one step an epoch" in line for line in warnings)
    assert any("test images: the test accuracy" in line and "(95% interval)" in line for line in warnings), warnings


def test_an_ordinary_run_gets_no_such_warning(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "mnist").symlink_to(SHARED_DATA / "mnist")
    result = cnnkit("train", "--data-dir", str(data), "--limit-train", "2000", "--limit-eval", "2000", "--epochs",
                    "1", "--model", "fast", "--quiet", "--no-checkpoint", "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_resume_takes_the_run_name_of_a_crashed_training(tmp_path):
    """After a crash (SIGKILL: nothing cleaned up) only `runs/.cut.partial-*` is left; `--resume runs/cut` finds it."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "mnist").symlink_to(SHARED_DATA / "mnist")
    runs = tmp_path / "runs"
    process = start_cnnkit("train", "--data-dir", str(data), "--limit-train", "512", "--limit-eval", "128",
                           "--epochs", "20", "--model", "fast", "--quiet", "--runs-dir", str(runs), "--name", "cut",
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    staging = wait_for_checkpoint(runs, 1, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert not (runs / "cut").exists() and staging.is_dir()
    resumed = cnnkit("train", "--resume", str(runs / "cut"), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert (runs / "cut" / "metrics.json").is_file() and not staging.exists()
    missing = cnnkit("train", "--resume", str(runs / "other"))
    assert missing.returncode != 0 and "runs/other: no such run directory" in missing.stderr


def test_predict_says_where_its_csv_went_and_nothing_to_predict_is_not_a_miscount(tmp_path):
    folder = small_folder(tmp_path / "folder", per_class=6)
    trained = cnnkit("train", "--dataset", f"imagefolder:{folder}", "--epochs", "1", "--quiet", "--no-checkpoint",
                     "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "d"), "--name", "r")
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "p.csv"
    written = cnnkit("predict", str(tmp_path / "runs" / "r"), str(folder / "c0"), "--csv", str(out))
    assert written.returncode == 0 and written.stderr.strip() == f"wrote 6 prediction(s) to {out}", written.stderr
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.png").write_text("not an image")
    (texts / "b.txt").write_text("not an image either")
    nothing = cnnkit("predict", str(tmp_path / "runs" / "r"), str(texts))
    assert nothing.returncode == 1 and nothing.stderr.startswith("cnnkit: error: nothing to predict: "), nothing.stderr


def test_train_help_groups_every_option_and_starts_with_the_usual_ones():
    from cnnkit.cli import OPTION_GROUPS
    from cnnkit.config import schema

    grouped = [name for names in OPTION_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(field.name for field in schema())  # each option in exactly one group
    result = run_cnnkit("train", "--help", env={**os.environ, "COLUMNS": "120"}, timeout=60)
    lines = result.stdout.splitlines()
    assert result.returncode == 0 and len(lines[0]) <= 100 and lines[1].strip().startswith("cnnkit train --resume")
    first_screen = "\n".join(lines[:40])
    assert "the usual options:" in first_screen and "--preset" in first_screen and "--epochs" in first_screen
    headings = [line[:-1] for line in lines if line.endswith(":") and not line.startswith(" ")]
    assert headings[1:1 + len(OPTION_GROUPS)] == list(OPTION_GROUPS)  # after "options:", in order


def test_a_data_dir_naming_the_dataset_folder_itself_points_to_its_parent_before_any_download(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for path in (SHARED_DATA / "mnist").iterdir():
        (folder / path.name).symlink_to(path)
    before = sorted(p.name for p in folder.iterdir())
    result = cnnkit("train", "--data-dir", str(folder), "--epochs", "1", "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode != 0 and result.stderr.strip() == (
        f"cnnkit: error: {folder} is the mnist folder itself; --data-dir names the folder that holds mnist/: "
        f"--data-dir {tmp_path}"), result.stderr
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing downloaded into it
    listed = cnnkit("datasets", "--data-dir", str(tmp_path))
    assert listed.returncode == 0 and f"looked in {tmp_path}" in listed.stdout


def test_a_mistyped_run_gets_the_close_name(tmp_path):
    folder = small_folder(tmp_path / "folder", per_class=4)
    trained = cnnkit("train", "--dataset", f"imagefolder:{folder}", "--epochs", "1", "--quiet", "--no-checkpoint",
                     "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "d"), "--name", "tour")
    assert trained.returncode == 0, trained.stderr
    result = cnnkit("evaluate", str(tmp_path / "runs" / "tuor"))
    assert result.returncode != 0 and result.stderr.strip().endswith(f"did you mean {tmp_path / 'runs' / 'tour'}?")


def test_tables_in_a_pipe_are_not_cut_at_80_columns(tmp_path):
    folder = small_folder(tmp_path / ("a-folder-with-a-long-descriptive-name-" + "x" * 40), per_class=4)
    trained = cnnkit("train", "--dataset", f"imagefolder:{folder}", "--epochs", "1", "--quiet", "--no-checkpoint",
                     "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "d"), "--name", "long")
    assert trained.returncode == 0, trained.stderr
    env = {key: value for key, value in os.environ.items() if key != "COLUMNS"}
    listed = run_cnnkit("runs", str(tmp_path / "runs"), env=env, timeout=120)
    assert listed.returncode == 0 and f"imagefolder:{folder}" in listed.stdout, listed.stdout

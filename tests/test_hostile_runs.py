"""Hostile input and faults on a training run, with real processes: no traceback, no lost training, no debris.

Every test runs `python -m cnnkit train` on small slices of the real MNIST files, and hurts it for real: a
learning rate that overflows, a model whose loss turns NaN on cue, a read-only file system, a runs folder
that is a file, a full file system (a 512 kB tmpfs, and one filled while training runs), SIGKILL of a
training and of a half-done write, and two trainings started with one --name. Each asserts the exit code,
exactly one stderr line and no traceback, that the trained weights exist where the message says, and that
nothing is left behind but a resumable checkpoint. The file systems are real tmpfs mounts; where this
machine cannot mount (no root), those tests skip and say why.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from checkpoints import wait_for_checkpoint
from processes import Started, run_cnnkit, start_cnnkit
from slices import SHARED_DATA

TRAIN = ["train", "--preset", "fast", "--data-dir", str(SHARED_DATA), "--limit-train", "2000", "--limit-eval", "500",
         "--epochs", "1"]
#: 2000 training images at the fast preset's batch of 128.
STEPS_PER_EPOCH = 16

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason=f"no MNIST files in {SHARED_DATA}")


def cnnkit(*args: str, env: dict | None = None, prefix: tuple[str, ...] = (), timeout: float = 300):
    return run_cnnkit(*args, env=env, timeout=timeout, prefix=prefix)


#: Runs a command as root without the capabilities that let root ignore file permissions, so a folder's
#: mode bits stop it as they stop any user (chmod alone does not stop root).
NO_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search")


def start(*args: str, env: dict | None = None) -> subprocess.Popen | Started:
    return start_cnnkit(*args, env=env)


def one_error_line(stderr: str) -> str:
    """The one line a failed command printed on stderr: no traceback, no second line."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("cnnkit: error: "), stderr
    return lines[0]


def debris(folder: Path) -> list[str]:
    """Hidden leftovers under `folder`: staging directories, name claims, temporary files."""
    return sorted(str(path.relative_to(folder)) for path in folder.rglob(".*")
                  if ".partial-" in path.name or path.name.endswith((".tmp", ".lock")))


def wait_until(condition: Callable[[], bool], process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out waiting for the training process"
        time.sleep(0.02)


def killed(process: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Signal `process` and wait for it: (its return code, its stdout)."""
    process.send_signal(sig)
    stdout, _ = process.communicate(timeout=60)
    return process.returncode, stdout or ""


def killed_between_writes(process: subprocess.Popen, folder: Path, timeout: float = 60) -> tuple[int, str]:
    """SIGKILL `process` at a moment when no temporary file is under `folder`: (its return code, its stdout).

    A training checkpoints every epoch, so a kill at a random moment may land mid-write and leave a
    `.checkpoint-*.tmp` (a CI run killed one in epoch 13's write). That is debris too, swept at the next start,
    but a test that counts the debris needs to know which it left: the process is stopped (SIGSTOP), killed if
    no temp file is there, else let go on for a moment and tried again.
    """
    deadline = time.monotonic() + timeout
    while True:
        process.send_signal(signal.SIGSTOP)
        if not any(name.endswith(".tmp") for name in debris(folder)) or time.monotonic() > deadline:
            return killed(process)
        process.send_signal(signal.SIGCONT)
        time.sleep(0.05)


# ---------------------------------------------------------------------------------------------------------
# 1. A diverged model is not a result

NAN_MODEL = '''
import torch
from torch import nn


class GoesNaN(nn.Module):
    """A small CNN whose training forward pass number `at` (1-based) and later return NaN logits."""

    def __init__(self, num_classes, at):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                                  nn.Linear(128, num_classes))
        self.at, self.calls = at, 0

    def forward(self, x):
        logits = self.body(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.at:
                logits = logits * float("nan")
        return logits


def build(input_shape, num_classes, at=1, **_):
    return GoesNaN(num_classes, at)
'''


def test_a_loss_that_turns_nan_stops_naming_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    from cnnkit.engine.checkpoint import read_checkpoint_document
    from cnnkit.runs import list_runs

    model = tmp_path / "nan_model.py"
    model.write_text(NAN_MODEL)
    at = STEPS_PER_EPOCH + 5  # the fifth step of epoch 2
    runs = tmp_path / "runs"
    result = cnnkit(*TRAIN, "--epochs", "3", "--model", f"{model}:build", "--model-kwargs", json.dumps({"at": at}),
                    "--runs-dir", str(runs), "--name", "nan", "--quiet")
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert f"became NaN or infinite at step {at} (epoch 2, batch 5 of {STEPS_PER_EPOCH})" in line, line
    assert "--lr" in line  # the fix
    assert not (runs / "nan").exists(), "a diverged run was saved as a run"
    (staging,) = runs.glob(".nan.partial-*")
    assert f"the checkpoint of epoch 1 is kept in {staging}; continue with: cnnkit train --resume {staging}" in line
    state = read_checkpoint_document(staging)["state"]
    assert state["epoch"] == 1  # the last good epoch's, not the diverged one's
    history = state["callbacks"]["History"]["history"]
    assert all(math.isfinite(value) for values in history.values() for value in values), history
    assert debris(runs) == [staging.name], "only the resumable checkpoint stays"
    assert [run.name for run in list_runs(runs)] == ["nan (unfinished)"]


def test_an_overflowing_learning_rate_stops_in_its_first_epoch_and_leaves_nothing(tmp_path):
    runs = tmp_path / "runs"
    result = cnnkit(*TRAIN, "--lr", "1e308", "--runs-dir", str(runs), "--quiet")
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert "training diverged: the training loss became NaN or infinite at step 2 (epoch 1," in line, line
    assert list(runs.iterdir()) == [], "no run, no staging directory, no claim"


def test_a_validation_loss_that_overflows_stops_before_history_or_checkpoint_record_it(tmp_path):
    """Training loss finite, validation NaN: caught by the epoch-end look at every figure of the logs."""
    import torch
    from torch import nn

    from cnnkit.engine.callbacks.checkpoint import Checkpoint
    from cnnkit.engine.checkpoint import has_checkpoint
    from cnnkit.engine.fit import fit
    from cnnkit.errors import TrainingDiverged
    from slices import mnist_dataset

    class NaNWhenEvaluated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(28 * 28, 10)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            logits = self.linear(images.flatten(1) / 255)
            return logits if self.training else logits * float("inf")

    with pytest.raises(TrainingDiverged, match=r"the validation loss is nan after epoch 1 \(step 8\)"):
        fit(NaNWhenEvaluated(), mnist_dataset(1000, 300), epochs=2, batch_size=128, progress=False,
            callbacks=[Checkpoint(tmp_path)], precision="fp32")
    assert not has_checkpoint(tmp_path) and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# 3. OS errors on the run directory, and a full disk


def test_a_runs_dir_that_cannot_hold_runs_is_one_line_before_anything_is_trained(tmp_path, mount_tmpfs):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    read_only = mount_tmpfs("read-only", "512k", read_only=True)
    cases = {blocker: "is a file, not a folder", blocker / "runs": "a part of the path is a file, not a folder",
             read_only: "the file system is read-only"}
    for runs_dir, problem in cases.items():
        result = cnnkit(*TRAIN, "--runs-dir", str(runs_dir), "--quiet")
        assert result.returncode == 1, result.stderr
        line = one_error_line(result.stderr)
        assert f"--runs-dir {runs_dir}" in line and problem in line, line
        assert "mnist" not in result.stdout, "it refused before loading data"
    assert blocker.read_text() == "not a folder" and list(read_only.iterdir()) == []


def test_a_runs_dir_without_write_permission_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    probe = subprocess.run([*NO_OVERRIDE, "touch", str(locked / "probe")], capture_output=True, text=True)
    if probe.returncode == 0 or "Permission denied" not in probe.stderr:
        pytest.skip(f"cannot make a folder unwritable for this user here (setpriv: {probe.stderr.strip()!r})")
    result = cnnkit(*TRAIN, "--runs-dir", str(locked), "--quiet", prefix=NO_OVERRIDE)
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert f"--runs-dir {locked}: cannot write a run there: permission denied" in line, line
    assert list(locked.iterdir()) == []


def test_a_disk_too_small_for_the_run_is_refused_before_training(tmp_path, mount_tmpfs):
    small = mount_tmpfs("small", "512k")
    result = cnnkit(*TRAIN, "--runs-dir", str(small))
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert f"--runs-dir {small}: " in line and "free, but this run needs about" in line, line
    assert "free some space or choose another --runs-dir" in line
    assert "Epoch 1/1" not in result.stdout, "it refused before training"
    assert list(small.iterdir()) == [], "no staging directory, no claim left"


def test_a_disk_that_fills_during_training_loses_nothing_the_run_is_rescued_whole(tmp_path, mount_tmpfs):
    from cnnkit.runs import load_run

    disk = mount_tmpfs("disk", "8m")
    rescue = tmp_path / "tmp"
    rescue.mkdir()
    process = start(*TRAIN, "--epochs", "2", "--runs-dir", str(disk), "--name", "full",
                    env={**os.environ, "TMPDIR": str(rescue)})
    filled = warned = False
    for line in process.stdout:
        if line.startswith("Epoch 1/2") and not filled:  # training is under way: fill the disk to the last byte
            with open(disk / "filler", "wb") as handle, pytest.raises(OSError):
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
            filled = True
        if "checkpoint of epoch 2 not written" in line:
            assert "training goes on, the checkpoint of epoch 1 is kept" in line, line
            warned = True
    stderr = process.stderr.read()
    assert process.wait() == 1, stderr
    assert filled and warned
    line = one_error_line(stderr)
    assert f"the trained run could not be written in {disk} (" in line and "no space left on the device" in line
    (rescued,) = rescue.glob("cnnkit-rescued-*/full")
    assert f"it is saved whole in {rescued} instead" in line, line
    run = load_run(rescued)  # whole: weights, model.json, metrics, report
    assert math.isfinite(run.metrics.test_accuracy) and run.metrics.epochs == 2
    assert (rescued / "report.html").is_file() and not list(rescued.glob("checkpoint*"))
    assert [path.name for path in disk.iterdir()] == ["filler"], "no staging directory, claim or temp file left"


# ---------------------------------------------------------------------------------------------------------
# 5 and 9. Debris of killed processes, and two runs with one name

WRITER = """
import signal, sys
from cnnkit.fileio import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half a download")
    print(tmp, flush=True)
    signal.pause()
"""


def writing(target: Path) -> tuple[subprocess.Popen, Path]:
    """A real process half-way through an atomic write of `target` (as a download is): it and its temp file."""
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    return process, Path(process.stdout.readline().strip())


def test_a_name_in_use_is_refused_at_once_and_the_next_start_sweeps_only_dead_processes_debris(tmp_path):
    from cnnkit.runs import list_runs

    runs, data = tmp_path / "runs", tmp_path / "data"
    (data / "mnist").mkdir(parents=True)
    for file in (SHARED_DATA / "mnist").iterdir():
        (data / "mnist" / file.name).symlink_to(file)
    live_writer = None
    try:
        # Two trainings with one name: the second is refused while the first trains (and goes on training).
        # 300 epochs: it is killed long before. 30 took 6.5 s alone, and a CI run once finished them while the
        # refused second training started up beside other tests, leaving nothing to sweep.
        first = start(*TRAIN, "--epochs", "300", "--threads", "1", "--runs-dir", str(runs), "--name", "twice",
                      "--quiet")
        resumable = wait_for_checkpoint(runs, 1, first)
        before = sorted(runs.iterdir())
        second = cnnkit(*TRAIN, "--runs-dir", str(runs), "--name", "twice", "--quiet")
        assert first.poll() is None, "the second training had to wait for the first"
        assert second.returncode == 1, second.stderr
        line = one_error_line(second.stderr)
        assert f"run name 'twice' is taken: another cnnkit training (pid {first.pid}) is running" in line, line
        assert sorted(runs.iterdir()) == before, "the refused training left nothing"
        assert killed_between_writes(first, runs)[0] == -signal.SIGKILL  # a resumable checkpoint, a dead claim
        assert sorted(debris(runs)) == [".twice.lock", resumable.name]

        # A training killed before its first checkpoint (its start sweeps the dead claim, keeps the checkpoint),
        # a download killed half-way, and one still going.
        doomed = start(*TRAIN, "--epochs", "300", "--no-checkpoint", "--runs-dir", str(runs), "--name", "doomed")
        wait_until(lambda: any(runs.glob(".doomed.partial-*")), doomed)
        code, stdout = killed(doomed)
        assert code == -signal.SIGKILL
        assert f"removed 1 leftover of interrupted cnnkit processes: {runs / '.twice.lock'}; kept 1" in stdout
        dead_writer, dead_tmp = writing(data / "mnist" / "train-images-idx3-ubyte.gz")
        assert killed(dead_writer)[0] == -signal.SIGKILL and dead_tmp.is_file()
        dead_checkpoint, half_checkpoint = writing(resumable / "checkpoint-0002.safetensors")  # killed mid-write
        assert killed(dead_checkpoint)[0] == -signal.SIGKILL and half_checkpoint.is_file()
        live_writer, live_tmp = writing(data / "mnist" / "t10k-images-idx3-ubyte.gz")
        doomed_staging = next(runs.glob(".doomed.partial-*"))
        assert sorted(debris(runs)) == sorted([".doomed.lock", doomed_staging.name, resumable.name,
                                               str(half_checkpoint.relative_to(runs))])

        result = cnnkit(*TRAIN, "--runs-dir", str(runs), "--data-dir", str(data), "--name", "next")
        assert result.returncode == 0, result.stderr
        swept = [line for line in result.stdout.splitlines() if line.startswith("removed ")]
        assert len(swept) == 1, result.stdout
        assert swept[0].startswith(f"removed 4 leftovers of interrupted cnnkit processes: {runs / '.doomed.lock'}, "
                                   f"{doomed_staging}, {half_checkpoint} and 1 more; "), swept
        assert f"; kept 1 unfinished run with a checkpoint (`cnnkit runs {runs}` lists how to resume)" in swept[0]
        assert debris(runs) == [resumable.name], "only the resumable checkpoint stays"
        assert (resumable / "checkpoint.json").is_file() and (runs / "next" / "model.safetensors").is_file()
        assert not dead_tmp.exists() and not half_checkpoint.exists()
        assert live_tmp.is_file(), "a write in progress is not debris"
        assert {run.name for run in list_runs(runs)} == {"next", "twice (unfinished)"}
        live_writer.send_signal(signal.SIGINT)  # its own clean exit removes its temp file
        live_writer.wait(timeout=60)
        assert not live_tmp.exists() and debris(data) == []
    finally:
        for process in (live_writer,):
            if process is not None and process.poll() is None:
                process.kill()


# ---------------------------------------------------------------------------------------------------------
# A user error never prints a traceback, unless asked for one


def test_a_user_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = str(tmp_path / "nowhere")
    plain = cnnkit("runs", missing)
    assert plain.returncode == 1 and "does not exist" in one_error_line(plain.stderr)
    for debug in (cnnkit("runs", missing, "--debug"), cnnkit("--debug", "runs", missing),
                  cnnkit("runs", missing, env={**os.environ, "CNNKIT_DEBUG": "1"})):
        assert debug.returncode == 1, debug.stderr
        assert debug.stderr.startswith("Traceback (most recent call last):"), debug.stderr
        assert debug.stderr.splitlines()[-1] == plain.stderr.strip()  # the same one line, after the traceback


def test_an_os_error_outside_training_is_one_line_naming_the_path_and_the_fix(tmp_path, mount_tmpfs):
    read_only = mount_tmpfs("read-only", "512k", read_only=True)
    result = cnnkit("datasets", "sample", "mnist", str(read_only / "digits"), "--count", "10",
                    "--data-dir", str(SHARED_DATA))
    assert result.returncode == 1, result.stderr
    line = one_error_line(result.stderr)
    assert f"{read_only}/" in line and "the file system is read-only: choose a location on a writable disk" in line

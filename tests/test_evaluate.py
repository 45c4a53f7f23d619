"""`cnnkit evaluate` finds a run's data where it was trained, needs only the test files, and fails offline
with one clear line: real subprocesses, a real local HTTP mirror or a dead local port, never the internet."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cnnkit.data.download import fetch_dataset, split_roles
from cnnkit.data.registry import get_spec
from cnnkit.data.sources import DataLocation, load_raw, load_test_raw
from cnnkit.errors import CnnkitError
from processes import run_cnnkit
from slices import SHARED_DATA

DEAD = "http://127.0.0.1:9"  # the discard port: connection refused at once, no network ever
T10K = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TRAIN_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
LIMIT_EVAL = 300


def _env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a new user: an empty HOME and cache, no CNNKIT_DATA, a dead mirror unless told."""
    env = {key: value for key, value in os.environ.items() if key not in ("CNNKIT_DATA", "CNNKIT_MIRROR")}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), COLUMNS="200", CNNKIT_MIRROR=DEAD)
    env.update(extra)
    return env


def cnnkit(*args: str, env: dict[str, str], cwd: Path | None = None,
           timeout: float = 300) -> subprocess.CompletedProcess:
    return run_cnnkit(*args, cwd=cwd, env=env, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def _copy_t10k(target: Path) -> Path:
    """A data root holding mnist/ with only the two test files (copied without read-only permissions)."""
    (target / "mnist").mkdir(parents=True)
    for name in T10K:
        shutil.copyfile(SHARED_DATA / "mnist" / name, target / "mnist" / name)
    return target


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, home) -> Path:
    """One real small training from the shared data, recorded in config.json as an absolute data_dir."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    runs = tmp_path_factory.mktemp("runs")
    result = _ok(cnnkit("train", "--epochs", "1", "--limit-train", "1000", "--limit-eval", str(LIMIT_EVAL),
                        "--data-dir", str(SHARED_DATA), "--runs-dir", str(runs), "--quiet", env=_env(home)))
    run = Path(result.stdout.strip().splitlines()[-1])
    assert json.loads((run / "config.json").read_text())["data_dir"] == str(SHARED_DATA)
    return run


def _reported(run: Path) -> float:
    return json.loads((run / "metrics.json").read_text())["test_accuracy"]


# ---------------------------------------------------------------------------------------------------------
# Where the data is found


def test_evaluate_uses_the_runs_recorded_data_dir(run_dir, home, tmp_path):
    result = _ok(cnnkit("evaluate", str(run_dir), "--limit", str(LIMIT_EVAL), "--json", env=_env(home), cwd=tmp_path))
    report = json.loads(result.stdout)
    assert report["accuracy"] == pytest.approx(_reported(run_dir), abs=1e-9)
    assert sum(map(sum, report["confusion_matrix"])) == LIMIT_EVAL
    assert not (home / ".cache" / "cnnkit").exists()  # neither looked for nor created in the default cache
    assert list(tmp_path.iterdir()) == []  # nothing written where it ran


def test_the_two_t10k_files_are_enough(run_dir, home, tmp_path):
    data = _copy_t10k(tmp_path / "data")
    result = _ok(cnnkit("evaluate", str(run_dir), "--data-dir", str(data), "--limit", str(LIMIT_EVAL), "--json",
                        env=_env(home)))
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(_reported(run_dir), abs=1e-9)
    assert sorted(p.name for p in (data / "mnist").iterdir()) == sorted(T10K)  # nothing fetched or added


def test_cnnkit_data_is_used_when_the_run_records_no_data_dir(run_dir, home, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config["data_dir"] = None
    (run / "config.json").write_text(json.dumps(config))
    data = _copy_t10k(tmp_path / "env-data")
    result = _ok(cnnkit("evaluate", str(run), "--limit", str(LIMIT_EVAL), "--json",
                        env=_env(home, CNNKIT_DATA=str(data))))
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(_reported(run_dir), abs=1e-9)


def test_a_relative_data_dir_is_taken_from_the_cwd_or_the_training_dir_and_named_when_not_found(
    run_dir, home, tmp_path
):
    project = tmp_path / "project"
    _copy_t10k(project / "data")
    run = project / "runs" / "train"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    config.update(data_dir="data", runs_dir="runs")  # as typed by someone training inside project/
    (run / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd, run_arg in ((project, "runs/train"), (elsewhere, str(run))):
        result = _ok(cnnkit("evaluate", run_arg, "--limit", str(LIMIT_EVAL), "--json", env=_env(home), cwd=cwd))
        assert json.loads(result.stdout)["accuracy"] == pytest.approx(_reported(run_dir), abs=1e-9)

    moved = tmp_path / "moved"
    shutil.move(run, moved)  # no longer under project/runs/: the training directory cannot be inferred
    result = cnnkit("evaluate", str(moved), "--limit", str(LIMIT_EVAL), env=_env(home), cwd=elsewhere)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1
    assert f"{elsewhere / 'data'} (the run's config.json data_dir 'data', relative, taken from the current directory)" \
        in result.stderr
    assert not (elsewhere / "data").exists() and not (home / ".cache" / "cnnkit").exists()


# ---------------------------------------------------------------------------------------------------------
# Offline, nothing there


def test_offline_on_an_empty_folder_is_one_clear_line_and_creates_nothing(run_dir, home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cnnkit("evaluate", str(run_dir), "--data-dir", str(empty), env=_env(home))  # progress bars on
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("cnnkit: error: ")  # no empty download bars
    for name in T10K:
        assert str(empty / "mnist" / name) in result.stderr
    for name in TRAIN_FILES:
        assert name not in result.stderr  # the test set never needs the train files
    for way in ("--data-dir", "CNNKIT_DATA", "CNNKIT_MIRROR"):
        assert way in result.stderr
    assert list(empty.iterdir()) == []

    absent = tmp_path / "not" / "there"
    result = cnnkit("evaluate", str(run_dir), "--data-dir", str(absent), "--json", env=_env(home))
    assert result.returncode == 1 and str(absent / "mnist" / T10K[0]) in result.stderr
    assert not (tmp_path / "not").exists()


# ---------------------------------------------------------------------------------------------------------
# Downloads: only the test files


def test_a_mirror_serves_only_the_test_files(run_dir, home, tmp_path, http_mirror):
    mirror = http_mirror(SHARED_DATA)
    data = tmp_path / "fresh" / "data"
    result = _ok(cnnkit("evaluate", str(run_dir), "--data-dir", str(data), "--limit", str(LIMIT_EVAL),
                        env=_env(home, CNNKIT_MIRROR=mirror.url)))
    assert sorted(mirror.requests) == sorted(f"/mnist/{name}" for name in T10K)
    assert sorted(p.name for p in (data / "mnist").iterdir()) == sorted(T10K)
    for name in T10K:
        assert (data / "mnist" / name).read_bytes() == (SHARED_DATA / "mnist" / name).read_bytes()
        assert name in result.stderr  # a download that ran shows its bar
    assert result.stdout.strip().splitlines()[-1].startswith(f"accuracy {_reported(run_dir):.4f} ")

    _ok(cnnkit("evaluate", str(run_dir), "--data-dir", str(data), "--json", env=_env(home, CNNKIT_MIRROR=mirror.url)))
    assert len(mirror.requests) == 2  # present files are trusted: no second request


# ---------------------------------------------------------------------------------------------------------
# The data layer underneath


def test_split_roles():
    assert split_roles(get_spec("mnist"), ("test",)) == ("test_images", "test_labels")
    assert split_roles(get_spec("mnist")) == ("train_images", "train_labels", "test_images", "test_labels")
    assert split_roles(get_spec("cifar10"), ("test",)) == ("archive",)


def test_load_raw_test_split_alone(tmp_path):
    root = _copy_t10k(tmp_path)
    raw = load_raw("mnist", root, download=False, splits=("test",))
    assert raw.train is None and raw.test[0].shape == (10000, 1, 28, 28) and raw.test[1][0] == 7
    with pytest.raises(CnnkitError, match="missing train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz"):
        load_raw("mnist", root, download=False)  # both splits need the train files too


def test_load_test_raw_takes_the_first_location_holding_the_files(tmp_path):
    empty, full = tmp_path / "empty", _copy_t10k(tmp_path / "full")
    empty.mkdir()
    raw = load_test_raw("mnist", [DataLocation(empty, "first"), DataLocation(full, "second")], mirror=DEAD,
                        progress=False)
    assert raw.test[0].shape == (10000, 1, 28, 28) and list(empty.iterdir()) == []


def test_failed_fetch_removes_every_folder_it_created(tmp_path):
    root = tmp_path / "a" / "b"
    with pytest.raises(CnnkitError) as caught:
        fetch_dataset(get_spec("mnist"), root, mirror=DEAD, progress=False, roles=("test_images", "test_labels"))
    message = str(caught.value)
    assert message.startswith(f"download of {DEAD}/mnist/{T10K[0]} failed")
    assert f"missing {root / 'mnist' / T10K[0]} and {root / 'mnist' / T10K[1]}" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_fetch_only_the_roles_asked_for(tmp_path, http_mirror):
    mirror = http_mirror(SHARED_DATA)
    folder = fetch_dataset(get_spec("fashion-mnist"), tmp_path, mirror=mirror.url, progress=False,
                           roles=("test_labels",))
    assert [p.name for p in folder.iterdir()] == ["t10k-labels-idx1-ubyte.gz"]
    assert mirror.requests == ["/fashion-mnist/t10k-labels-idx1-ubyte.gz"]


# ---------------------------------------------------------------------------------------------------------
# How the model runs


MAPPED_SCRIPT = """
import ctypes, sys, torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
if sys.argv[1] == "forward":
    from cnnkit.engine.inference import predict_logits
    predict_logits(torch.nn.Flatten(), torch.zeros((1, 1, 2, 2), dtype=torch.uint8))
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
block = torch.ones(50_000_000)  # 200 MB, as a large network's activations
print(libc.mallinfo2().hblkhd)  # bytes in blocks mapped for themselves (unmapped when freed)
"""


def test_every_command_that_runs_a_model_keeps_its_large_buffers_for_reuse():
    """evaluate, predict, serve and the audit run models outside `cnnkit.train`, whose start used to be the one
    place glibc was told to keep large freed blocks: without it each large buffer is mapped for itself,
    unmapped when freed and faulted in anew by the next batch (EfficientNet-Lite2 at 160 px scored 500 photos in
    22 s instead of 7). The setting now comes with the first forward pass: after one, a 200 MB buffer comes
    from the heap, which keeps it for the next; without, glibc maps it on its own (glibc's mallinfo2 says)."""
    try:
        ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        pytest.skip("not glibc 2.33 or later (the setting is glibc's)")

    def mapped(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", MAPPED_SCRIPT, mode], capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip())

    assert mapped("forward") < 100_000_000 < 200_000_000 <= mapped("none")


def test_a_run_scores_images_in_the_batches_it_recorded(run_dir, tmp_path):
    """A run's --eval-batch-size is what its evaluate and predict use: a large network records a small one
    (1,000 EfficientNet-Lite2 inputs at 160 px take 12 GB)."""
    from cnnkit.api import evaluate_run
    from cnnkit.prediction import predict_files
    from cnnkit.runs import load_run

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    assert config["eval_batch_size"] == 1000
    (run / "config.json").write_text(json.dumps({**config, "eval_batch_size": 64}))
    loaded = load_run(run)
    seen: list[int] = []
    loaded.model.register_forward_pre_hook(lambda module, inputs: seen.append(len(inputs[0])))
    report = evaluate_run(loaded, data_dir=str(SHARED_DATA), limit=LIMIT_EVAL, progress=False)
    assert report.accuracy == pytest.approx(_reported(run_dir)) and seen == [64] * 4 + [LIMIT_EVAL - 256]
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image
    for index in range(70):
        Image.new("L", (28, 28), index).save(images / f"{index}.png")
    seen.clear()
    assert len(predict_files(loaded, [images]).predictions) == 70 and seen == [64, 6]

"""Hostile input, through the real command line: bad folder entries, bad option values, tampered run files, and
downloads that never end (issue 10, classes 4, 6, 7 and 8).

Every command runs as its own `python -m cnnkit` process and is checked for what a user sees: the exit
code, exactly one stderr line naming the file or option at fault, no traceback, and nothing left behind.
Folder entries are real symlink loops, dangling links and FIFOs; downloads come from a real HTTP server on
127.0.0.1; runs are real run directories written by `runs.save_model` (untrained weights: what is tested is
loading and refusing, not accuracy), tampered the way a person with a text editor would.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from processes import run_cnnkit
from slices import SHARED_DATA

#: Runs a command as root without the capabilities that let root ignore file permissions, so a folder's
#: mode bits stop it as they stop any user (chmod alone does not stop root).
NO_OVERRIDE = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search")
TRAIN_SMALL = ["--data-dir", str(SHARED_DATA), "--epochs", "1", "--limit-train", "64", "--limit-eval", "64",
               "--quiet"]

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason=f"no MNIST files in {SHARED_DATA}")


def cnnkit(*args: str, env: dict | None = None, prefix: tuple[str, ...] = (), timeout: float = 300,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_cnnkit(*args, env=env, timeout=timeout, cwd=cwd, prefix=prefix)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command printed on stderr: non-zero exit, no traceback, no second line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("cnnkit: error: "), result.stderr
    return lines[0]


def everything_under(folder: Path) -> list[str]:
    """Every name below `folder`, hidden temporary files included ([] when it does not exist)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []


def write_digit_pngs(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """`count` real MNIST test digits as PNG files in `folder`."""
    from cnnkit.data.tensors import load_test_split

    images = load_test_split("mnist", str(SHARED_DATA), limit=200, progress=False).test.images.numpy()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        paths.append(folder / f"digit_{seed}_{index}.png")
        Image.fromarray(images[(seed * count + index) % len(images), 0]).save(paths[-1])
    return paths


def save_run(run_dir: Path, architecture: str = "fast", shape: tuple[int, int, int] = (1, 28, 28),
             classes: list[str] | None = None, dataset: str = "mnist") -> Path:
    """A real run directory (model.safetensors + model.json) with untrained weights, as training writes it."""
    from cnnkit.models import build_model
    from cnnkit.preprocess import preprocessing_meta
    from cnnkit.runs import save_model

    classes = classes or [str(digit) for digit in range(10)]
    model = build_model(architecture, shape, len(classes), mean=[33.3] * shape[0], std=[78.6] * shape[0])
    sample = np.random.default_rng(0).integers(0, 256, (16, *shape), dtype=np.uint8)
    run_dir.mkdir(parents=True)
    save_model(run_dir, model, {
        "architecture": architecture, "model_kwargs": {}, "classes": classes, "dataset": dataset,
        "input": {"channels": shape[0], "height": shape[1], "width": shape[2], "dtype": "uint8", "layout": "NCHW"},
        "preprocessing": preprocessing_meta(shape[0], model.rescale.mean, model.rescale.std, sample), "tta": "none"})
    return run_dir


def strip_weights_record(run_dir: Path) -> None:
    """Rewrite model.safetensors without what this version records about model.json: a run from before."""
    from safetensors.torch import load_file, save_file

    weights = run_dir / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "cnnkit.model"})


def tampered(source: Path, target: Path, edit) -> Path:
    """A copy of run `source` whose model.json `edit` (a function of the parsed JSON) has changed."""
    shutil.copytree(source, target)
    meta = json.loads((target / "model.json").read_text())
    edit(meta)
    (target / "model.json").write_text(json.dumps(meta))
    return target


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A `fast` and a `seed` MNIST run, and a `fast` run saved the way earlier versions saved it."""
    root = tmp_path_factory.mktemp("hostile-runs")
    old = save_run(root / "fast-old")
    strip_weights_record(old)
    return {"fast": save_run(root / "fast"), "seed": save_run(root / "seed", "seed"), "fast-old": old}


@pytest.fixture(scope="module")
def digit(tmp_path_factory) -> Path:
    return write_digit_pngs(tmp_path_factory.mktemp("digit"), 1)[0]


# ---------------------------------------------------------------------------------------------------------
# Class 4: one bad entry must not abort a folder


def hostile_entries(folder: Path) -> list[str]:
    """A symlink loop named x.png, a dangling link, a FIFO, a link to a folder and a garbage file, all
    named like images, in `folder`; returns their names."""
    os.symlink("x.png", folder / "x.png")  # x.png -> x.png: ELOOP on every open or stat
    os.symlink(folder / "nowhere.png", folder / "dangling.png")
    os.mkfifo(folder / "fifo.png")  # opening it would wait for a writer forever
    os.symlink(folder.parent, folder / "folder.png")
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return ["x.png", "dangling.png", "fifo.png", "folder.png", "garbage.png"]


@pytest.mark.slow
def test_a_symlink_loop_fifo_and_dangling_link_do_not_abort_training(tmp_path):
    """The issue's report: a symlink loop named x.png aborted training with ELOOP while scanning."""
    for name, seed in (("three", 0), ("seven", 1)):
        write_digit_pngs(tmp_path / "photos" / name, 12, seed)
    bad = hostile_entries(tmp_path / "photos" / "three")
    result = cnnkit("train", "--dataset", f"imagefolder:{tmp_path / 'photos'}", "--epochs", "1", "--model", "fast",
                    "--data-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"), "--no-checkpoint",
                    timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    skipped = next(line for line in result.stderr.splitlines() if "skipped " in line)  # stderr: a word about the data
    assert skipped.startswith(f"cnnkit: warning: skipped {len(bad)} unreadable file(s)")
    assert all(f"three/{name}" in skipped for name in bad)
    assert (tmp_path / "runs" / "train" / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "runs" / "train" / "metrics.json").read_text())
    assert metrics["num_test"] >= 1


def test_the_folder_scan_names_every_bad_entry_and_keeps_the_rest(tmp_path):
    from cnnkit.data.folder import load_image_folder

    for name, seed in (("a", 0), ("b", 1)):
        write_digit_pngs(tmp_path / name, 5, seed)
    bad = hostile_entries(tmp_path / "a")
    data = load_image_folder(tmp_path, None, workers=1)
    assert [item.file for item in data.skipped] == sorted(f"a/{name}" for name in bad)
    assert not any(item.refused for item in data.skipped)  # unreadable: no flag would admit them
    assert sum(len(labels) for _, labels in data.splits.values()) == 10
    assert data.classes == ["a", "b"]


def test_predict_on_a_folder_predicts_the_readable_files_and_names_the_rest(runs, tmp_path):
    good = write_digit_pngs(tmp_path / "in", 4)
    write_digit_pngs(tmp_path / "in" / "sub", 2, seed=1)
    bad = hostile_entries(tmp_path / "in")
    result = cnnkit("predict", str(runs["seed"]), str(tmp_path / "in"), str(tmp_path / "missing.png"),
                    "--csv", str(tmp_path / "out.csv"), timeout=120)
    line = one_error_line(result)
    predicted = [row.split("\t")[0] for row in result.stdout.strip().splitlines()]
    assert sorted(predicted) == sorted(str(p) for p in [*good, *(tmp_path / "in" / "sub").iterdir()])
    assert line.startswith(f"cnnkit: error: skipped {len(bad) + 1} unreadable file(s), predicted the other 6 "
                           f"(written to {tmp_path / 'out.csv'}): ")
    for name, why in [("x.png", "is a symlink loop"), ("dangling.png", "is a dangling symlink"),
                      ("fifo.png", "is not a regular file"), ("folder.png", "is a folder"),
                      ("garbage.png", "not a readable image")]:
        assert f"{tmp_path / 'in' / name}: {why}" in line
    assert f"{tmp_path / 'missing.png'}: no such file or directory" in line
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 1 + 6  # the answers are kept too


def test_predict_names_an_unlistable_folder_and_an_unreadable_file(runs, tmp_path):
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop root's permission override")
    good = write_digit_pngs(tmp_path / "in", 2)
    write_digit_pngs(tmp_path / "in" / "locked", 2, seed=1)
    secret = write_digit_pngs(tmp_path / "in" / "open", 1, seed=2)[0]
    os.chmod(tmp_path / "in" / "locked", 0)
    os.chmod(secret, 0)
    try:
        result = cnnkit("predict", str(runs["seed"]), str(tmp_path / "in"), prefix=NO_OVERRIDE, timeout=120)
    finally:
        os.chmod(tmp_path / "in" / "locked", 0o755)
    line = one_error_line(result)
    assert [row.split("\t")[0] for row in result.stdout.strip().splitlines()] == [str(p) for p in good]
    assert f"{tmp_path / 'in' / 'locked'}: cannot list this folder (Permission denied)" in line
    assert f"{secret}: not a readable image" in line and "Permission denied" in line


def test_predict_with_nothing_readable_exits_non_zero_with_one_line(runs, tmp_path):
    (tmp_path / "empty").mkdir()
    result = cnnkit("predict", str(runs["seed"]), str(tmp_path / "empty"), timeout=120)
    assert one_error_line(result) == (f"cnnkit: error: nothing to predict: "
                                      f"{tmp_path / 'empty'}: no image files in this directory")
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------------------------
# Class 6: option values that crashed or were silently accepted


BAD_OPTIONS = [
    (["--val", "nan"], "--val must be"), (["--val", "inf"], "--val must be"), (["--val", "1.5"], "--val must be"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number"),
    (["--weight-decay", "-1"], "--weight-decay must be at least 0"),
    (["--warmup", "nan"], "--warmup must be a finite number"), (["--warmup", "-5"], "--warmup must be at least 0"),
    (["--seed", "99999999999999999999999"], "--seed must be at most"),
    (["--name", "n" * 245], "--name is 245 bytes long; use at most 200"),
    (["--threads", "2000"], "--threads is 2000, but this machine has"),
    (["--image-size", "64"], "--image-size 64x64 applies to image folders"),
    (["--channels", "3"], "--channels 3 applies to image folders"),
    (["--data-dir="], "--data-dir is empty"), (["--runs-dir="], "--runs-dir is empty"),
    (["--model-kwargs", '{"zzz": 1}'], "model 'seed' cannot be built with model_kwargs {\"zzz\": 1}"),
    (["--model", "fast", "--model-kwargs", '{"widths": [16, "32", 64]}'],
     "model 'fast': model_kwargs widths must be Sequence[int], got [16, \"32\", 64]"),
    (["--model", "resnet", "--model-kwargs", '{"depth": "20"}'], "model 'resnet': model_kwargs depth must be int"),
    (["--model", "fast", "--model-kwargs", '{"widths": [100000, 100000, 100000]}'],
     "billion parameters"),
]


@pytest.mark.slow
def test_bad_option_values_are_refused_with_one_line_naming_the_option(tmp_path):
    if (os.cpu_count() or 1) >= 2000:
        pytest.skip("this machine has 2000 cores: --threads 2000 is legal here")

    def attempt(index: int) -> tuple[list[str], str, subprocess.CompletedProcess, Path]:
        args, expected = BAD_OPTIONS[index]
        runs_dir = tmp_path / f"runs{index}"
        # The flag under test comes last, so it wins over TRAIN_SMALL's value of the same flag.
        return args, expected, cnnkit("train", *TRAIN_SMALL, "--runs-dir", str(runs_dir), *args), runs_dir

    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(attempt, range(len(BAD_OPTIONS))))
    for args, expected, result, runs_dir in outcomes:
        line = one_error_line(result)
        assert expected in line, (args, line)
        assert everything_under(runs_dir) == [], args  # refused before anything was written


EMPTY_PATHS = [  # an unset shell variable ("$RUN") in each path argument that is not a training option
    (["train", "--config", ""], "--config is empty; give a file"),
    (["train", "--resume", " "], "--resume is empty; give a run directory"),
    (["evaluate", ""], "RUN is empty; give a run directory"),
    (["predict", "", "digit.png"], "RUN is empty; give a run directory"),
    (["compare", "runs/a", ""], "RUN is empty; give a run directory"),
    (["runs", ""], "DIR is empty; give a folder"),
    (["export", "runs/a", "--out", ""], "--out is empty; give a path"),
    (["predict", "runs/a", ""], "IMAGE_OR_DIR is empty; give an image or a folder"),
    (["evaluate", "runs/a", "--data-dir", ""], "--data-dir is empty; give a folder"),
    (["audit", ""], "RUN_OR_DATASET is empty; give a run directory or a dataset"),
]


def test_an_empty_path_argument_is_refused_by_name_and_not_read_as_the_current_folder(tmp_path):
    """Once `--config ""` said ".: a folder, not a regular file" and `cnnkit runs ""` listed the current folder."""
    for args, expected in EMPTY_PATHS:
        result = cnnkit(*args, cwd=tmp_path)
        assert one_error_line(result) == f"cnnkit: error: {expected}", args
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_the_datasets_own_shape_is_accepted(tmp_path):
    result = cnnkit("train", *TRAIN_SMALL, "--runs-dir", str(tmp_path / "runs"), "--image-size", "28",
                    "--channels", "1", "--no-checkpoint", timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "runs" / "train" / "config.json").read_text())["image_size"] == [28, 28]


# ---------------------------------------------------------------------------------------------------------
# Class 7: model.json and config.json are input too


TAMPERED = {
    "height-200000": (lambda m: m["input"].update(height=200000),
                      "input.height must be a whole number from 1 to 8,192"),
    "format-version-string": (lambda m: m.update(format_version="1"), 'format_version must be a whole number'),
    "height-string": (lambda m: m["input"].update(height="28"), 'input.height must be a whole number'),
    "classes-string": (lambda m: m.update(classes="0123456789"), "classes must be a list of 1 to 100,000"),
    "fast-input-32": (lambda m: m["input"].update(height=32, width=32),
                      "input is 1x32x32, but dataset mnist's images are 1x28x28"),
    "classes-swapped": (lambda m: m.update(classes=["1", "0", *map(str, range(2, 10))]),
                        "class 0 is '1' here, '0' there"),
    "std-zero": (lambda m: m["preprocessing"].update(std=[0]), "preprocessing.std must be a list of 1 positive"),
    "mean-edited": (lambda m: m["preprocessing"].update(mean=[100.0]),
                    "model.json says preprocessing mean [100.0]"),
    "architecture": (lambda m: m.update(architecture="seed"),
                     "model.json says architecture seed, the weights were saved with fast"),
    "kwargs-huge": (lambda m: m.update(model_kwargs={"widths": [100000, 100000, 100000]}),
                    'model.json says model_kwargs {"widths": [100000, 100000, 100000]}, the weights were saved '
                    "with {}"),
    "tta": (lambda m: m.update(tta="spin"), "tta must be one of none, flip, shift, flip-shift"),
    "folder-input-32": (lambda m: (m.update(dataset="imagefolder:/somewhere"), m["input"].update(height=32, width=32),
                                   m["preprocessing"].update(layout=None)),
                        "model.json says input (channels x height x width) 1x32x32, the weights were saved with "
                        "1x28x28"),
}


@pytest.mark.slow
def test_a_tampered_model_json_is_refused_before_anything_is_built(runs, digit, tmp_path):
    def attempt(name: str) -> tuple[str, str, subprocess.CompletedProcess]:
        edit, expected = TAMPERED[name]
        run_dir = tampered(runs["fast"], tmp_path / name, edit)
        return name, expected, cnnkit("predict", str(run_dir), str(digit), timeout=120)

    with ThreadPoolExecutor(max_workers=3) as pool:
        outcomes = list(pool.map(attempt, TAMPERED))
    for name, expected, result in outcomes:
        line = one_error_line(result)
        assert f"{tmp_path / name / 'model.json'}" in line, (name, line)
        assert expected in line, (name, line)
        assert result.stdout == "", name


def test_evaluate_refuses_a_fast_run_whose_input_size_was_changed(runs, tmp_path):
    """The issue's report: evaluate reported 90% while predict, resizing to the tampered size, was wrong."""
    edit, expected = TAMPERED["fast-input-32"]
    run_dir = tampered(runs["fast"], tmp_path / "fast32", edit)
    assert expected in one_error_line(cnnkit("evaluate", str(run_dir), "--data-dir", str(SHARED_DATA)))


def test_evaluate_does_not_decode_a_folder_the_run_was_not_trained_on(runs, tmp_path):
    """`"dataset": "imagefolder:/usr/share"` made evaluate decode and cache that whole tree."""
    tree = tmp_path / "share"
    for name in ("icons", "doc", "pixmaps"):
        write_digit_pngs(tree / name, 3)
    run_dir = tampered(runs["fast"], tmp_path / "run", lambda m: m.update(dataset=f"imagefolder:{tree}"))
    result = cnnkit("evaluate", str(run_dir), "--data-dir", str(tmp_path / "cache"))
    line = one_error_line(result)
    assert f"{tree}: its class folders are not the model's 10 classes" in line
    assert "no folder with images for class(es) 0, 1, 2, 3, 4 ..." in line
    assert everything_under(tmp_path / "cache") == []  # nothing decoded, nothing cached


def test_a_run_from_an_earlier_version_is_checked_by_its_tensor_shapes(runs, digit, tmp_path):
    """Without the weights' record, a class count that no longer fits names the tensors that differ."""
    run_dir = tampered(runs["fast-old"], tmp_path / "five", lambda m: m.update(dataset="digits", classes=list("01234")))
    line = one_error_line(cnnkit("predict", str(run_dir), str(digit)))
    assert f"{run_dir / 'model.safetensors'}: the weights do not fit this model: shape differs, file vs model" in line
    assert "body.14.weight (10, 64) vs (5, 64), body.14.bias (10,) vs (5,)" in line
    assert "model.json describes 'fast' with 5 classes and input 1x28x28: it was edited" in line
    untouched = cnnkit("predict", str(runs["fast-old"]), str(digit))
    assert untouched.returncode == 0 and untouched.stdout.startswith(str(digit)), untouched.stderr


def test_a_config_json_that_is_not_an_object_is_refused(runs, digit, tmp_path):
    run_dir = tampered(runs["fast"], tmp_path / "run", lambda m: None)
    (run_dir / "config.json").write_text("[1, 2]")
    line = one_error_line(cnnkit("predict", str(run_dir), str(digit)))
    assert f"{run_dir / 'config.json'}: expected a JSON object of option values, got list" in line
    (run_dir / "config.json").write_text(json.dumps({"data_dir": ["a"], "name": 5}))
    line = one_error_line(cnnkit("evaluate", str(run_dir)))
    assert f"{run_dir / 'config.json'}: data_dir must be a string, got ['a']" in line


@pytest.mark.parametrize("change, expected", [
    ({"epochs": "10"}, "epochs must be a whole number, got '10'"),
    ({"model_kwargs": [1]}, "model_kwargs must be a table of names to values"),
    ({"model_kwargs": {"zzz": 1}}, "cannot be built with model_kwargs"),
    ({"image_size": [64, 64]}, "64x64 applies to image folders"),
    ({"lr": float("nan")}, "lr must be a finite number, got nan"),
])
def test_a_tampered_config_json_given_as_config_is_refused(tmp_path, change, expected):
    from cnnkit.config import TrainConfig

    config = {**TrainConfig().to_dict(), "data_dir": str(SHARED_DATA), "epochs": 1, "limit_train": 64,
              "limit_eval": 64, "runs_dir": str(tmp_path / "runs"), **change}
    (tmp_path / "config.json").write_text(json.dumps(config))
    line = one_error_line(cnnkit("train", "--config", str(tmp_path / "config.json"), "--quiet"))
    assert expected in line
    assert everything_under(tmp_path / "runs") == []


# ---------------------------------------------------------------------------------------------------------
# Class 8: downloads


class _Endless(http.server.BaseHTTPRequestHandler):
    """Answer 200 and send zeros until the client hangs up; `announce` optionally claims a Content-Length."""

    announce: int | None = None

    def __init__(self, *args, directory: str, log: list[str], **kwargs) -> None:
        self.log = log
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self.log.append(self.path)
        self.send_response(200)
        if self.announce is not None:
            self.send_header("Content-Length", str(self.announce))
        self.end_headers()
        block = b"\0" * (1 << 16)
        try:
            while True:
                self.wfile.write(block)
        except OSError:  # the client stopped reading and closed the connection
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


class _Announces1TB(_Endless):
    announce = 10**12


def _assert_download_refused(line: str, data_root: Path, files: list[str]) -> None:
    """The message names the files still missing and both remedies; nothing is left under the data root."""
    assert "missing " in line and all(str(data_root / "mnist" / name) in line for name in files)
    assert "--data-dir DIR" in line and "CNNKIT_MIRROR=URL" in line
    assert everything_under(data_root) == []


MNIST_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
               "t10k-labels-idx1-ubyte.gz"]


def test_an_endless_response_is_cut_at_the_files_size_and_leaves_nothing(tmp_path, http_mirror):
    mirror = http_mirror(tmp_path, handler=_Endless)
    result = cnnkit("datasets", "download", "mnist", "--data-dir", str(tmp_path / "data"), "--mirror", mirror.url,
                    timeout=120)
    line = one_error_line(result)
    assert (f"download of {mirror.url}/mnist/train-images-idx3-ubyte.gz stopped at 15.9 MB: "
            "train-images-idx3-ubyte.gz is 9.9 MB (9,912,422 bytes), and the source kept sending") in line
    _assert_download_refused(line, tmp_path / "data", MNIST_FILES)
    assert mirror.requests == ["/mnist/train-images-idx3-ubyte.gz"]


def test_an_announced_oversized_response_is_refused_before_reading(tmp_path, http_mirror):
    mirror = http_mirror(tmp_path, handler=_Announces1TB)
    result = cnnkit("datasets", "download", "mnist", "--data-dir", str(tmp_path / "data"), "--mirror", mirror.url,
                    timeout=120)
    line = one_error_line(result)
    assert (f"download of {mirror.url}/mnist/train-images-idx3-ubyte.gz refused: the server announces 1000.0 GB, "
            "but train-images-idx3-ubyte.gz is 9.9 MB (9,912,422 bytes) (at most 15.9 MB accepted)") in line
    _assert_download_refused(line, tmp_path / "data", MNIST_FILES)


def test_a_local_mirror_file_that_never_ends_is_cut_too(tmp_path):
    """A local mirror folder whose files are links to /dev/zero: the copy is capped like a download."""
    (tmp_path / "mirror" / "mnist").mkdir(parents=True)
    for name in MNIST_FILES:
        os.symlink("/dev/zero", tmp_path / "mirror" / "mnist" / name)
    result = cnnkit("evaluate", str(save_run(tmp_path / "run")), "--data-dir", str(tmp_path / "data"), "--mirror",
                    str(tmp_path / "mirror"), timeout=120)
    line = one_error_line(result)
    assert (f"download of {tmp_path / 'mirror' / 'mnist' / 't10k-images-idx3-ubyte.gz'} stopped at 3.5 MB: "
            "t10k-images-idx3-ubyte.gz is 1.6 MB (1,648,877 bytes)") in line
    assert everything_under(tmp_path / "data") == []


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_offline_training_names_the_missing_files_and_both_remedies(tmp_path):
    env = {**os.environ, "CNNKIT_MIRROR": f"http://127.0.0.1:{_closed_port()}"}
    result = cnnkit("train", "--dataset", "kmnist", "--data-dir", str(tmp_path / "data"), "--runs-dir",
                    str(tmp_path / "runs"), "--quiet", env=env, timeout=120)
    line = one_error_line(result)
    assert "could not connect" in line and "Connection refused" in line
    for name in MNIST_FILES:
        assert str(tmp_path / "data" / "kmnist" / name) in line
    assert "--data-dir DIR or CNNKIT_DATA=DIR" in line and "CNNKIT_MIRROR=URL" in line
    assert everything_under(tmp_path / "data") == [] and everything_under(tmp_path / "runs") == []

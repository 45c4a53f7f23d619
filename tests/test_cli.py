"""The CLI end to end, in real subprocesses, on real MNIST slices."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from processes import run_cnnkit
from slices import SHARED_DATA, extract_cifar_subset, mnist_dataset

RUN_FILES = {"config.json", "history.csv", "metrics.json", "model.safetensors", "model.json", "history.png",
             "confusion_matrix.png", "errors.png"}


def cnnkit(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    result = run_cnnkit(*args, cwd=cwd, timeout=timeout, env={**os.environ, "COLUMNS": "200"})
    if check and result.returncode != 0:
        raise AssertionError(f"cnnkit {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One real `cnnkit train` on an 8,000-image MNIST slice, shared by the tests below."""
    runs = tmp_path_factory.mktemp("runs")
    result = cnnkit("train", "--epochs", "2", "--limit-train", "8000", "--limit-eval", "1000",
                    "--data-dir", str(SHARED_DATA), "--runs-dir", str(runs))
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    assert run_dir == runs / "train"
    return run_dir


def test_train_writes_every_run_file_and_honest_metrics(trained_run):
    assert RUN_FILES <= {p.name for p in trained_run.iterdir()}
    assert not [p for p in trained_run.parent.iterdir() if p.name.startswith(".")]  # no staging leftovers
    metrics = json.loads((trained_run / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "train_seconds", "epochs", "model", "dataset"):
        assert key in metrics
    assert metrics["model"] == "seed" and metrics["dataset"] == "mnist" and metrics["epochs"] == 2
    assert metrics["num_train"] == 8000 and metrics["num_test"] == 1000 and metrics["val_source"] == "held-out"
    assert metrics["test_accuracy"] >= 0.93  # measured 0.949, 0.973, 0.963 for seeds 0, 1, 2
    assert metrics["selected"]["keep"] == "best"  # validation is held out, so the best epoch is kept
    history = (trained_run / "history.csv").read_text().splitlines()
    assert history[0] == "epoch,loss,accuracy,val_loss,val_accuracy,lr,seconds" and len(history) == 3
    for png in ("history.png", "confusion_matrix.png", "errors.png"):
        with Image.open(trained_run / png) as image:
            assert image.format == "PNG" and image.width > 300
    meta = json.loads((trained_run / "model.json").read_text())
    assert meta["input"] == {"channels": 1, "height": 28, "width": 28, "dtype": "uint8", "layout": "NCHW"}
    assert meta["classes"] == [str(i) for i in range(10)]


def test_second_run_gets_the_next_name(trained_run, tmp_path):
    (tmp_path / "train").mkdir()
    result = cnnkit("train", "--epochs", "1", "--limit-train", "300", "--limit-eval", "100",
                    "--data-dir", str(SHARED_DATA), "--runs-dir", str(tmp_path), "--quiet")
    assert result.stdout.strip().splitlines()[-1] == str(tmp_path / "train2")


def test_evaluate_reproduces_the_reported_test_accuracy(trained_run):
    metrics = json.loads((trained_run / "metrics.json").read_text())
    result = cnnkit("evaluate", str(trained_run), "--data-dir", str(SHARED_DATA), "--limit", "1000", "--json")
    report = json.loads(result.stdout)
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
    assert np.array(report["confusion_matrix"]).sum() == 1000


def _write_pngs(folder: Path, count: int = 12) -> tuple[list[Path], list[str]]:
    """MNIST test digits as PNG files of several kinds: as-is, ink-on-paper RGB, enlarged JPEG-like sizes."""
    test = mnist_dataset(limit_train=100, limit_eval=1000).test
    paths, labels = [], []
    for i in range(count):
        pixels = test.images[i, 0].numpy()
        image = Image.fromarray(pixels, "L")
        if i % 3 == 1:  # dark ink on white paper, in colour, as a phone photo of a digit would be
            image = Image.fromarray(255 - pixels, "L").convert("RGB")
        elif i % 3 == 2:  # a larger image with an alpha channel
            image = image.resize((84, 84), Image.Resampling.BICUBIC).convert("RGBA")
        path = folder / f"digit_{i:02d}.png"
        image.save(path)
        paths.append(path)
        labels.append(str(int(test.labels[i])))
    return paths, labels


def test_predict_reads_pngs_of_any_mode_and_size(trained_run, tmp_path):
    paths, labels = _write_pngs(tmp_path)
    result = cnnkit("predict", str(trained_run), *map(str, paths))
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [line[0] for line in lines] == [str(p) for p in paths]
    predicted = [line[1] for line in lines]
    assert all(0.0 < float(line[2]) <= 1.0 for line in lines)
    correct = sum(p == t for p, t in zip(predicted, labels))
    assert correct >= 11, (predicted, labels)  # 12 easy test digits; a trained model gets them


def test_predict_json_and_directories(trained_run, tmp_path):
    _write_pngs(tmp_path, count=4)
    (tmp_path / ".hidden.png").write_bytes(b"not an image")
    result = cnnkit("predict", str(trained_run), str(tmp_path), "--json", "--top", "3")
    items = json.loads(result.stdout)
    assert [Path(item["file"]).name for item in items] == [f"digit_{i:02d}.png" for i in range(4)]
    for item in items:
        assert set(item) == {"file", "label", "confidence", "top"}
        assert len(item["top"]) == 3 and item["top"][0] == [item["label"], item["confidence"]]
        assert item["top"][0][1] >= item["top"][1][1] >= item["top"][2][1]


def test_unreadable_image_is_a_one_line_error_without_traceback(trained_run, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    result = cnnkit("predict", str(trained_run), str(bad), check=False)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and str(bad) in result.stderr


def test_missing_dataset_without_network_is_a_clear_error(tmp_path):
    result = cnnkit("evaluate", str(tmp_path), check=False)
    assert result.returncode == 1 and "not a cnnkit run directory" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", [[sys.executable, "-m", "cnnkit"], ["cnnkit"]], ids=["python -m cnnkit", "cnnkit"])
def test_interrupted_training_leaves_no_run_directory(tmp_path, command):
    if command == ["cnnkit"]:  # the installed command, beside this interpreter (a virtual environment's bin/)
        script = shutil.which("cnnkit", path=str(Path(sys.executable).parent))
        if script is None:
            pytest.skip("no cnnkit command installed beside this Python")
        command = [script]
    process = subprocess.Popen([*command, "train", "--epochs", "5", "--data-dir", str(SHARED_DATA),
                                "--runs-dir", str(tmp_path), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 60
    while not any(tmp_path.iterdir()) and time.monotonic() < deadline:  # the staging dir appears
        time.sleep(0.1)
    time.sleep(1.5)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGINT, stderr  # ended by SIGINT after cleaning up: a shell reads 130
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "datasets", "summary", "presets"])
def test_every_command_has_help_with_an_example(command):
    result = cnnkit(command, "--help")
    assert "example" in result.stdout and "usage: cnnkit " + command in result.stdout


def test_summary_prints_the_keras_like_table():
    result = cnnkit("summary", "seed", "--dataset", "mnist")
    assert "225,034" in result.stdout and "(None, 64, 11, 11)" in result.stdout and "18,496" in result.stdout


def test_presets_lists_what_each_sets():
    out = cnnkit("presets").stdout
    assert "fast:" in out and "model = fast" in out and "seed:" in out


def test_datasets_lists_presence(tmp_path):
    out = cnnkit("datasets", "--data-dir", str(SHARED_DATA)).stdout
    rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
    assert "yes" in rows["mnist"] and "yes" in rows["fashion-mnist"] and "no" in rows["cifar10"]


@pytest.mark.slow
def test_train_evaluate_predict_on_a_real_image_folder(tmp_path):
    """The same commands on a folder of real CIFAR-10 JPEGs (3 classes, RGB, 32x32)."""
    classes = ("airplane", "automobile", "frog")
    folder = extract_cifar_subset(SHARED_DATA / "cifar10-jpg.tar.gz", tmp_path / "photos", classes,
                                  {"train": 400, "test": 100})
    (folder / "train" / "frog" / ".DS_Store").write_bytes(b"junk")
    data_dir, runs = tmp_path / "cache", tmp_path / "runs"
    result = cnnkit("train", "--dataset", f"imagefolder:{folder}", "--model", "fast", "--epochs", "4",
                    "--batch-size", "64", "--lr", "3e-3", "--data-dir", str(data_dir), "--runs-dir", str(runs))
    run_dir = Path(result.stdout.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    meta = json.loads((run_dir / "model.json").read_text())
    assert meta["classes"] == list(classes) and meta["input"]["channels"] == 3 and meta["input"]["height"] == 32
    assert metrics["num_test"] == 300 and metrics["num_train"] + metrics["num_val"] == 1200
    assert metrics["test_accuracy"] >= 0.6  # three classes: chance is 0.33; measured 0.79
    report = json.loads(cnnkit("evaluate", str(run_dir), "--data-dir", str(data_dir), "--json").stdout)
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"])
    frog = sorted((folder / "test" / "frog").iterdir())[0]
    big = tmp_path / "frog_big.jpg"
    Image.open(frog).resize((200, 150)).save(big, quality=90)  # another size and aspect: resized as recorded
    items = json.loads(cnnkit("predict", str(run_dir), str(frog), str(big), "--json").stdout)
    assert [item["label"] in classes for item in items] == [True, True]
    frogs = json.loads(cnnkit("predict", str(run_dir), str(folder / "test" / "frog"), "--json").stdout)
    recall = sum(item["label"] == "frog" for item in frogs) / len(frogs)
    assert len(frogs) == 100 and recall >= 0.5  # chance is 0.33; measured 0.9


def test_datasets_download_from_a_local_mirror(http_mirror, tmp_path):
    mirror = http_mirror(SHARED_DATA)
    result = cnnkit("datasets", "download", "mnist", "--data-dir", str(tmp_path), "--mirror", mirror.url)
    assert Path(result.stdout.strip().splitlines()[-1]) == tmp_path / "mnist"
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        assert (tmp_path / "mnist" / name).read_bytes() == (SHARED_DATA / "mnist" / name).read_bytes()
    assert len(mirror.requests) == 4
    listing = cnnkit("datasets", "--data-dir", str(tmp_path)).stdout
    assert "yes" in next(line for line in listing.splitlines() if " mnist " in line)


def test_a_runs_config_json_repeats_it_and_the_callback_flags_reach_the_run(tmp_path):
    runs = tmp_path / "runs"
    out = cnnkit("train", "--epochs", "2", "--limit-train", "1000", "--limit-eval", "300", "--ema", "0.9",
                 "--patience", "3", "--keep", "best", "--data-dir", str(SHARED_DATA), "--runs-dir", str(runs),
                 "--quiet").stdout.strip().splitlines()
    first = Path(out[-1])
    # The end-of-training summary: kept epoch, test accuracy with its interval, top mistakes, the files.
    assert re.match(r"kept epoch [12]/2 \(best, (raw|ema) weights\): val_accuracy 0\.\d{4}", out[-6])
    assert re.match(r"test accuracy 0\.\d{4} \(95% CI 0\.\d{4}-0\.\d{4}: 300 test images", out[-5])
    assert out[-4].startswith("most confused (true -> predicted): ") and out[-4].count("->") == 4
    assert out[-2].startswith("files: ") and "steps.csv" in out[-2] and "model.safetensors" in out[-2]
    header = (first / "history.csv").read_text().splitlines()[0].split(",")
    assert {"ema_val_accuracy", "ema_val_loss", "val_accuracy", "seconds"} <= set(header)
    metrics = json.loads((first / "metrics.json").read_text())
    selected = metrics["selected"]
    assert selected["keep"] == "best" and selected["weights"] in ("raw", "ema") and selected["epoch"] in (1, 2)
    assert metrics["val_accuracy"] == selected["value"]  # the kept weights' validation accuracy, not the last's

    second = Path(cnnkit("train", "--config", str(first / "config.json"), "--quiet").stdout.strip().splitlines()[-1])
    assert second == runs / "train2"
    assert json.loads((second / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    repeat = json.loads((second / "metrics.json").read_text())
    assert repeat["test_accuracy"] == metrics["test_accuracy"] and repeat["selected"] == selected  # same seed, CPU


def test_predict_skips_an_unreadable_file_predicts_the_rest_and_writes_csv(trained_run, tmp_path):
    import csv

    folder = tmp_path / "in"
    folder.mkdir()
    paths, labels = _write_pngs(folder, count=6)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    result = cnnkit("predict", str(trained_run), str(folder), "--csv", str(tmp_path / "out.csv"), "--top", "2",
                    check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "skipped 1 unreadable file(s), predicted the other 6" in result.stderr and "broken.png" in result.stderr
    printed = [line.split("\t") for line in result.stdout.strip().splitlines()]
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["file"] for row in rows] == [line[0] for line in printed] == [str(p) for p in paths]
    assert [row["label"] for row in rows] == [line[1] for line in printed]
    assert all(len(row["top"].split(";")) == 2 and row["top"].startswith(row["label"] + ":") for row in rows)
    assert sum(row["label"] == label for row, label in zip(rows, labels)) >= 5


def test_the_python_api_predicts_paths_pil_images_and_arrays_alike(trained_run, tmp_path):
    import cnnkit

    paths, labels = _write_pngs(tmp_path, count=3)
    run = cnnkit.load_run(trained_run)
    items = [paths[0], Image.open(paths[1]), np.asarray(Image.open(paths[2]))]
    by_api = cnnkit.predict_images(run, items, top=3)
    by_files = cnnkit.predict_files(run, paths, top=3).predictions
    assert [p.label for p in by_api] == [p.label for p in by_files]
    assert [p.confidence for p in by_api] == pytest.approx([p.confidence for p in by_files])
    assert by_api[1].file == "image 1" and len(by_api[0].top) == 3
    with pytest.raises(cnnkit.CnnkitError, match="image 0: expected a uint8 image array"):
        cnnkit.predict_images(run, [np.zeros((28, 28), np.float32)])

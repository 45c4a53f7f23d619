"""Test-time augmentation: the averaging checked by hand on a tiny model, and TTA through real runs
(train records it; evaluate, predict and ONNX export use it; --tta overrides it; flip refused for digits)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import cnnkit
from cnnkit.api import evaluate_run
from cnnkit.errors import CnnkitError
from cnnkit.models.classifier import ImageClassifier
from cnnkit.models.tta import TestTimeAugmentation
from cnnkit.runs import load_run
from processes import run_cnnkit
from slices import SHARED_DATA, extract_cifar_subset, mnist_dataset

CLASSES = ("airplane", "automobile", "frog")
REFUSED = "mirrors images, but"


def cnnkit_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = run_cnnkit(*args, timeout=300, env={**os.environ, "COLUMNS": "200"})
    if check and result.returncode != 0:
        raise AssertionError(f"cnnkit {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def tiny_model(channels: int) -> nn.Module:
    """One 3x3 convolution (no symmetry in its weights) and a linear head: flips and shifts change its logits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5)).eval()


def moved(images: np.ndarray, rows: int, cols: int) -> torch.Tensor:
    """Images moved by one pixel, the edge reflected: numpy's own reflect padding, then a window of it."""
    height, width = images.shape[-2:]
    padded = np.pad(images, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
    return torch.from_numpy(padded[..., 1 - rows:1 - rows + height, 1 - cols:1 - cols + width].astype(np.float32))


@pytest.fixture(scope="module")
def cifar_images(tmp_path_factory) -> torch.Tensor:
    folder = extract_cifar_subset(SHARED_DATA / "cifar10-jpg.tar.gz", tmp_path_factory.mktemp("jpg"), CLASSES,
                                  {"train": 3, "test": 2})
    data = cnnkit.load_dataset(f"imagefolder:{folder}", str(folder.parent / "cache"), val=1, progress=False)
    return data.train.images


@pytest.mark.parametrize("source", ["mnist", "cifar"])
def test_tta_is_the_mean_of_the_logits_of_the_hand_made_views(source, cifar_images):
    images = mnist_dataset(limit_train=500, limit_eval=100).test.images[:8] if source == "mnist" else cifar_images
    model = tiny_model(images.shape[1])
    x = images.float()
    with torch.no_grad():
        model(x)  # materialise the lazy head
        plain, mirror = model(x), model(x.flip(-1))
        down_right, up_left = model(moved(images.numpy(), 1, 1)), model(moved(images.numpy(), -1, -1))
        mirrored_shifts = [model(moved(images.numpy(), r, c).flip(-1)) for r, c in ((1, 1), (-1, -1))]
        expected = {
            "flip": (plain + mirror) / 2,
            "shift": (plain + down_right + up_left) / 3,
            "flip-shift": (plain + down_right + up_left + mirror + sum(mirrored_shifts)) / 6,
        }
        for views, want in expected.items():
            got = TestTimeAugmentation(model, views)(images)  # uint8 in, as every cnnkit model takes
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got, plain, atol=1e-3)  # the views did change the answer


def test_tta_refuses_an_unknown_view():
    with pytest.raises(CnnkitError, match="must be one of flip, shift, flip-shift"):
        TestTimeAugmentation(tiny_model(1), "rotate")


# ---------------------------------------------------------------------------------------------------------
# Through real runs


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory) -> Path:
    """A real `cnnkit train` on a colour image folder of CIFAR-10 JPEGs, tested with flip-shift TTA."""
    root = tmp_path_factory.mktemp("cifar-run")
    folder = extract_cifar_subset(SHARED_DATA / "cifar10-jpg.tar.gz", root / "photos", CLASSES,
                                  {"train": 100, "test": 40})
    result = cnnkit_cli("train", "--dataset", f"imagefolder:{folder}", "--model", "fast", "--epochs", "2",
                        "--batch-size", "32", "--lr", "3e-3", "--augment", "crop=2", "--tta", "flip-shift",
                        "--threads", "1", "--data-dir", str(root / "cache"), "--runs-dir", str(root / "runs"),
                        "--quiet")
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mnist-run")
    result = cnnkit.train(dataset="mnist", data_dir=str(SHARED_DATA), epochs=1, limit_train=500, limit_eval=200,
                          threads=1, runs_dir=str(root), progress=False, log=lambda *_: None)
    return result.run_dir


def test_a_run_records_its_tta_and_flip_and_loads_with_them(cifar_run):
    meta = json.loads((cifar_run / "model.json").read_text())
    metrics = json.loads((cifar_run / "metrics.json").read_text())
    assert (meta["tta"], meta["flip"], meta["mirror_ok"]) == ("flip-shift", True, True)  # colour folder: mirrored
    assert (metrics["tta"], metrics["flip"]) == ("flip-shift", True)
    run = load_run(cifar_run)
    assert run.tta == "flip-shift" and isinstance(run.model, TestTimeAugmentation)
    bare = load_run(cifar_run, tta="none")
    assert bare.tta == "none" and isinstance(bare.model, ImageClassifier)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(run.model(images), TestTimeAugmentation(bare.model, "flip-shift")(images))


def test_evaluate_uses_the_runs_tta_and_the_flag_overrides_it(cifar_run):
    metrics = json.loads((cifar_run / "metrics.json").read_text())
    assert evaluate_run(cifar_run, progress=False).accuracy == pytest.approx(metrics["test_accuracy"])
    reports = {tta: json.loads(cnnkit_cli("evaluate", str(cifar_run), "--tta", tta, "--json").stdout)
               for tta in ("none", "flip", "flip-shift")}
    assert reports["flip-shift"]["accuracy"] == pytest.approx(metrics["test_accuracy"])
    for tta, report in reports.items():
        assert report["accuracy"] == pytest.approx(evaluate_run(cifar_run, tta=tta, progress=False).accuracy)
        assert report["accuracy"] > 0.5  # three classes: chance is 0.33
    assert len({report["loss"] for report in reports.values()}) == 3  # three different models answered


def test_predict_uses_the_runs_tta_unless_told(cifar_run):
    image = sorted((cifar_run.parent.parent / "photos" / "test" / "frog").iterdir())[0]
    answers = {tta: json.loads(cnnkit_cli("predict", str(cifar_run), str(image), "--json", "--top", "3",
                                          *(["--tta", tta] if tta else [])).stdout)[0]
               for tta in (None, "flip-shift", "none")}
    assert answers[None]["top"] == answers["flip-shift"]["top"]
    assert answers["none"]["top"] != answers[None]["top"]


def test_onnx_export_carries_the_tta(cifar_run, tmp_path):
    import onnxruntime

    result = cnnkit.export_run(cifar_run, "onnx", out=tmp_path / "model.onnx", parity_images=50)
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["tta"] == "flip-shift"
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    (probabilities,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    with torch.no_grad():
        expected = load_run(cifar_run).model(images).softmax(1).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_flip_tta_on_a_digit_run_is_refused_in_one_line(mnist_run):
    result = cnnkit_cli("evaluate", str(mnist_run), "--tta", "flip", "--data-dir", str(SHARED_DATA), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and REFUSED in result.stderr
    assert "use tta shift or none, or train with flip yes" in result.stderr
    with pytest.raises(CnnkitError, match=REFUSED):
        load_run(mnist_run, tta="flip-shift")
    reports = {tta: json.loads(cnnkit_cli("evaluate", str(mnist_run), "--tta", tta, "--data-dir", str(SHARED_DATA),
                                          "--limit", "200", "--json").stdout) for tta in ("none", "shift")}
    assert reports["shift"]["loss"] != reports["none"]["loss"]  # shifting digits is allowed, and ran
    assert reports["shift"]["accuracy"] == pytest.approx(json.loads((mnist_run / "metrics.json").read_text())
                                                         ["test_accuracy"], abs=0.1)


def test_training_with_flip_tta_on_digits_is_refused_before_training_unless_flip_yes(tmp_path):
    logged: list[str] = []
    with pytest.raises(CnnkitError, match=REFUSED):
        cnnkit.train(dataset="mnist", data_dir=str(SHARED_DATA), epochs=1, limit_train=200, limit_eval=100,
                     tta="flip", threads=1, runs_dir=str(tmp_path), progress=False, log=logged.append)
    assert not list(tmp_path.iterdir())  # no run, not even a staging folder
    result = cnnkit.train(dataset="mnist", data_dir=str(SHARED_DATA), epochs=1, limit_train=200, limit_eval=100,
                          tta="flip", flip="yes", threads=1, runs_dir=str(tmp_path), progress=False,
                          log=lambda *_: None)
    assert (result.metrics["tta"], result.metrics["flip"]) == ("flip", True)
    assert load_run(result.run_dir).tta == "flip"  # the user's explicit flip=yes: mirrored digits were learnt


def test_tta_auto_is_the_mirror_where_training_mirrors_and_none_on_digits(tmp_path):
    """One preset (transfer-best says tta auto) for photos and digits: what ran is recorded, never "auto"."""
    runs = {}
    for flip in ("auto", "yes"):
        result = cnnkit.train(dataset="mnist", data_dir=str(SHARED_DATA), epochs=1, limit_train=200, limit_eval=100,
                              tta="auto", flip=flip, threads=1, runs_dir=str(tmp_path / "runs"),
                              name=f"flip-{flip}", progress=False, log=lambda *_: None)
        meta = json.loads((result.run_dir / "model.json").read_text())
        runs[flip] = (result.metrics["tta"], result.metrics["flip"], meta["tta"], load_run(result.run_dir).tta)
    assert runs["auto"] == ("none", False, "none", "none")  # digits are not mirrored, so neither is the test
    assert runs["yes"] == ("flip", True, "flip", "flip")  # the user mirrored them: the test views follow
    photos = extract_cifar_subset(SHARED_DATA / "cifar10-jpg.tar.gz", tmp_path / "photos", CLASSES,
                                  {"train": 20, "test": 10})
    result = cnnkit.train(dataset=f"imagefolder:{photos}", epochs=1, tta="auto", model="fast", threads=1,
                          data_dir=str(tmp_path / "cache"), runs_dir=str(tmp_path / "runs"), name="photos",
                          progress=False, log=lambda *_: None)
    assert (result.metrics["tta"], result.metrics["flip"]) == ("flip", True)
    assert load_run(result.run_dir).tta == "flip"

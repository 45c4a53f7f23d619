"""A user's own model: any nn.Module through the Python API, and FILE.py:FUNCTION through the CLI, on real MNIST."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import cnnkit
from cnnkit.errors import CnnkitError
from processes import run_cnnkit
from slices import SHARED_DATA, mnist_dataset

MODEL_FILE = '''from torch import nn


def build(input_shape, num_classes, width=8):
    """A small network of the user's: float images in, logits out."""
    return nn.Sequential(nn.Conv2d(input_shape[0], width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))


def broken(input_shape, num_classes):
    raise ValueError("this net needs colour images")


def not_a_module(input_shape, num_classes):
    return "a string"
'''


class TinyNet(nn.Module):
    """A plain PyTorch module written for float images, as a user would write it."""

    def __init__(self, channels: int = 1, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(16, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype.is_floating_point
        return self.classifier(self.features(images))


def cnnkit_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cnnkit(*args, cwd=cwd, timeout=300, env={**os.environ, "COLUMNS": "200"})


def quiet(*_args) -> None:
    pass


@pytest.fixture(autouse=True)
def one_thread():
    """The machine's cores are shared: in-process training here uses one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# The Python API


def test_a_plain_module_trains_with_fit_and_evaluates_predicts_and_saves(tmp_path):
    torch.manual_seed(0)
    data = mnist_dataset(3000, 500)
    net = TinyNet()
    history = cnnkit.fit(net, data, epochs=2, lr=3e-3, progress=False)
    assert history.history["val_accuracy"][-1] > 0.6  # it learned: chance is 0.1
    net.eval()
    report = cnnkit.evaluate(net, data.test, data.classes)  # the same float pixel values fit gave it
    assert report.accuracy > 0.6 and not net.training  # its own mode is left as it was
    probabilities = cnnkit.predict(net, data.test.images[:8])
    assert probabilities.shape == (8, 10) and torch.allclose(probabilities.sum(1), torch.ones(8), atol=1e-5)

    path = cnnkit.save_run(net, data, history, tmp_path / "plain")
    meta = json.loads((path / "model.json").read_text())
    assert meta["architecture"] == "custom:TinyNet" and meta["preprocessing"]["std"] == [1.0]
    with pytest.raises(CnnkitError, match=r"Python object \(TinyNet\).*model=TinyNet"):
        cnnkit.load_run(path)
    run = cnnkit.load_run(path, model=TinyNet())
    assert cnnkit.evaluate(run.model, data.test, data.classes).accuracy == report.accuracy


def test_train_takes_a_module_or_a_builder_and_the_run_names_it(tmp_path):
    common = dict(dataset="mnist", data_dir=str(SHARED_DATA), epochs=2, limit_train=3000, limit_eval=300,
                  runs_dir=str(tmp_path), progress=False, log=quiet, lr=3e-3, threads=1)
    result = cnnkit.train(model=TinyNet(), name="object", **common)
    assert result.metrics["test_accuracy"] > 0.5
    assert result.model.body.__class__ is TinyNet  # wrapped: the standardisation travels inside
    meta = json.loads((result.run_dir / "model.json").read_text())
    assert meta["architecture"] == "custom:TinyNet" and meta["preprocessing"]["std"] != [1.0]
    assert json.loads((result.run_dir / "config.json").read_text())["model"] == "custom:TinyNet"
    with pytest.raises(CnnkitError, match="model=TinyNet"):
        cnnkit.load_run(result.run_dir)
    run = cnnkit.load_run(result.run_dir, model=lambda shape, classes: TinyNet(shape[0], classes))
    data = mnist_dataset(3000, 300)
    assert cnnkit.evaluate(run.model, data.test, data.classes).accuracy == result.metrics["test_accuracy"]

    def builder(input_shape, num_classes):
        return TinyNet(input_shape[0], num_classes)

    first = cnnkit.train(model=builder, name="built", **common)
    again = cnnkit.train(model=builder, name="built-again", **common)
    assert first.metrics["test_accuracy"] == again.metrics["test_accuracy"]  # built under the run's seed
    assert json.loads((first.run_dir / "model.json").read_text())["architecture"].endswith("builder")
    with pytest.raises(CnnkitError, match="a config cannot rebuild it"):  # e.g. --config that run's config.json
        cnnkit.resolve_config(model="custom:TinyNet")


def test_model_values_are_checked_without_running_the_file(tmp_path):
    (tmp_path / "mynet.py").write_text(MODEL_FILE + "\nraise SystemExit('never run by the check')\n")
    spec = str(tmp_path / "mynet.py")
    assert cnnkit.resolve_config(model=f"{spec}:build").model == f"{spec}:build"
    with pytest.raises(CnnkitError, match=r"file .*nothere\.py not found"):
        cnnkit.resolve_config(model=str(tmp_path / "nothere.py") + ":build")
    with pytest.raises(CnnkitError, match="defines no top-level 'nope'"):
        cnnkit.resolve_config(model=f"{spec}:nope")
    with pytest.raises(CnnkitError, match=r"or FILE\.py:FUNCTION.*did you mean 'fast'"):
        cnnkit.resolve_config(model="fats")


def test_a_file_function_that_raises_or_returns_no_module_is_one_clear_line(tmp_path):
    (tmp_path / "mynet.py").write_text(MODEL_FILE)
    common = dict(dataset="mnist", data_dir=str(SHARED_DATA), epochs=1, limit_train=200, limit_eval=100,
                  runs_dir=str(tmp_path / "runs"), progress=False, log=quiet)
    with pytest.raises(CnnkitError) as raised:
        cnnkit.train(model=f"{tmp_path}/mynet.py:broken", **common)
    message = str(raised.value)
    assert "raised ValueError: this net needs colour images (at mynet.py line 12)" in message and "\n" not in message
    with pytest.raises(CnnkitError, match="returned str, not a torch.nn.Module"):
        cnnkit.train(model=f"{tmp_path}/mynet.py:not_a_module", **common)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # nothing half-written


# ---------------------------------------------------------------------------------------------------------
# The CLI: --model FILE.py:FUNCTION, and --trust-code to load it again


@pytest.fixture(scope="module")
def file_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("user")
    (folder / "mynet.py").write_text(MODEL_FILE)
    result = cnnkit_cli("train", "--model", "mynet.py:build", "--model-kwargs", '{"width": 12}', "--epochs", "2",
                        "--lr", "3e-3", "--limit-train", "3000", "--limit-eval", "500", "--threads", "1",
                        "--data-dir", str(SHARED_DATA), "--runs-dir", "runs", "--quiet", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / result.stdout.strip().splitlines()[-1]


def test_a_file_model_trains_through_the_cli_and_the_run_records_its_code(file_run):
    folder = file_run.parent.parent
    meta = json.loads((file_run / "model.json").read_text())
    source = (folder / "mynet.py").read_bytes()
    assert meta["architecture"] == "mynet.py:build" and meta["model_kwargs"] == {"width": 12}
    assert meta["code"] == {"path": str(folder / "mynet.py"), "sha256": hashlib.sha256(source).hexdigest(),
                            "function": "build", "copy": "model_source.py"}
    assert (file_run / "model_source.py").read_bytes() == source
    metrics = json.loads((file_run / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.5 and metrics["weights_from"] is None


def test_loading_a_file_model_needs_trust_code_and_the_same_file(file_run):
    folder = file_run.parent.parent
    expected = json.loads((file_run / "metrics.json").read_text())["test_accuracy"]
    evaluate = ("evaluate", str(file_run), "--data-dir", str(SHARED_DATA), "--limit", "500", "--json")

    refused = cnnkit_cli(*evaluate, cwd=folder)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "runs that code" in refused.stderr and "--trust-code" in refused.stderr
    with pytest.raises(CnnkitError, match="trust_code=True"):
        cnnkit.load_run(file_run)

    trusted = cnnkit_cli(*evaluate, "--trust-code", cwd=folder)
    assert trusted.returncode == 0, trusted.stderr
    assert json.loads(trusted.stdout)["accuracy"] == expected

    data = mnist_dataset(3000, 500)
    Image.fromarray(data.test.images[0, 0].numpy()).save(folder / "digit.png")
    assert "--trust-code" in cnnkit_cli("predict", str(file_run), "digit.png", cwd=folder).stderr
    predicted = cnnkit_cli("predict", str(file_run), "digit.png", "--json", "--trust-code", cwd=folder)
    assert predicted.returncode == 0 and json.loads(predicted.stdout)[0]["file"] == "digit.png"
    for refused_too in (lambda: cnnkit.export_run(file_run), lambda: cnnkit.evaluate_run(file_run)):
        with pytest.raises(CnnkitError, match="--trust-code"):
            refused_too()

    original = (folder / "mynet.py").read_text()
    (folder / "mynet.py").write_text(original.replace("width=8", "width=9"))
    try:
        edited = cnnkit_cli(*evaluate, "--trust-code", cwd=folder)
        assert edited.returncode == 1 and "has changed since the run was trained" in edited.stderr
        assert edited.stderr.count("\n") == 1
        (folder / "mynet.py").rename(folder / "moved.py")  # gone: the run's own verified copy is used
        run = cnnkit.load_run(file_run, trust_code=True)
        assert cnnkit.evaluate(run.model, data.test, data.classes).accuracy == expected
    finally:
        (folder / "mynet.py").write_text(original)
        (folder / "moved.py").unlink(missing_ok=True)


def test_a_missing_model_file_is_a_one_line_cli_error(tmp_path):
    result = cnnkit_cli("train", "--model", "nothere.py:build", "--data-dir", str(SHARED_DATA), cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "--model 'nothere.py:build': file nothere.py not found" in result.stderr

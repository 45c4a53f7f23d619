"""Exported models (ONNX, TorchScript) on real MNIST runs: parity with PyTorch, and no way to feed them wrongly."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import onnxruntime  # in the `test` extra: these tests must run, never skip, where CI installs it
import pytest
import torch

import cnnkit
from cnnkit.errors import CnnkitError
from cnnkit.export import PARITY_TOLERANCE, export_run, load_torchscript_metadata, missing_extra_message
from cnnkit.runs import load_run
from slices import SHARED_DATA, mnist_dataset

PARITY_IMAGES = 1000
# torch 2.13 marks torch.jit.save/load deprecated (in favour of torch.export); they still work and are tested here.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.* is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two real one-epoch MNIST runs: the seed CNN and the `fast` preset (BatchNorm and a crop layer)."""
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    runs_dir = tmp_path_factory.mktemp("runs")
    made = {}
    for preset in ("seed", "fast"):
        result = cnnkit.train(preset=preset, dataset="mnist", data_dir=str(SHARED_DATA), epochs=1, limit_train=2000,
                              limit_eval=500, runs_dir=str(runs_dir), name=preset, progress=False,
                              log=lambda *_: None)
        made[preset] = result.run_dir
    return made


@pytest.fixture(scope="module")
def onnx_exports(runs) -> dict:
    """Each run exported once to its default RUN/model.onnx."""
    return {name: export_run(run_dir, "onnx", parity_images=PARITY_IMAGES) for name, run_dir in runs.items()}


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return mnist_dataset(2000, PARITY_IMAGES).test.images


def _eager(run_dir: Path, images: torch.Tensor) -> np.ndarray:
    """PyTorch eager probabilities, computed here independently of cnnkit.export."""
    model = load_run(run_dir).model
    with torch.inference_mode():
        return torch.softmax(model(images), dim=1).numpy()


@pytest.mark.parametrize("name", ["seed", "fast"])
def test_onnx_export_matches_pytorch_on_1000_real_test_images(runs, onnx_exports, test_images, name):
    result = onnx_exports[name]
    assert result.path == runs[name] / "model.onnx" and result.path.is_file()
    assert result.format == "onnx"
    assert result.images == PARITY_IMAGES and result.data == "mnist test images"  # real data, not the fallback
    assert result.max_abs_diff <= PARITY_TOLERANCE == 1e-4 and result.top1_agreement == 1.0
    assert result.seconds > 0 and "top-1 agreement 100.00%" in result.summary()

    # The same check, done here from scratch: onnxruntime on the file vs the run's model in eager mode.
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(["probabilities"], {"images": batch.numpy()})[0]
                          for batch in test_images.split(300)])
    expected = _eager(runs[name], test_images)
    assert got.shape == expected.shape == (PARITY_IMAGES, 10)
    assert np.abs(got - expected).max() <= 1e-4
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    labels = mnist_dataset(2000, PARITY_IMAGES).test.labels.numpy()
    assert (got.argmax(1) == labels).mean() > 0.5  # a trained model (chance is 0.1): a meaningful comparison


@pytest.mark.parametrize("name", ["seed", "fast"])
def test_onnx_graph_takes_uint8_images_with_a_dynamic_batch_and_returns_probabilities(onnx_exports, test_images,
                                                                                       name):
    session = onnxruntime.InferenceSession(str(onnx_exports[name].path), providers=["CPUExecutionProvider"])
    (graph_input,), (graph_output,) = session.get_inputs(), session.get_outputs()
    assert (graph_input.name, graph_input.type) == ("images", "tensor(uint8)")
    assert isinstance(graph_input.shape[0], str) and graph_input.shape[1:] == [1, 28, 28]  # symbolic batch
    assert (graph_output.name, graph_output.type) == ("probabilities", "tensor(float)")
    assert isinstance(graph_output.shape[0], str) and graph_output.shape[1] == 10
    for batch in (1, 7):
        probabilities = session.run(None, {"images": test_images[:batch].numpy()})[0]
        assert probabilities.shape == (batch, 10) and probabilities.dtype == np.float32
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert (probabilities >= 0).all()


def test_onnx_metadata_holds_classes_input_and_preprocessing(runs, onnx_exports):
    session = onnxruntime.InferenceSession(str(onnx_exports["fast"].path), providers=["CPUExecutionProvider"])
    props = session.get_modelmeta().custom_metadata_map
    meta = json.loads((runs["fast"] / "model.json").read_text())
    assert json.loads(props["classes"]) == meta["classes"] == [str(d) for d in range(10)]
    assert json.loads(props["input"]) == {"name": "images", **meta["input"]}
    assert json.loads(props["preprocessing"]) == meta["preprocessing"]
    assert json.loads(props["output"])["shape"] == ["batch", 10]
    assert props["cnnkit_version"] == cnnkit.__version__ and props["architecture"] == "fast"
    assert "uint8" in session.get_modelmeta().description


def test_the_onnx_graph_cannot_be_fed_wrongly(onnx_exports, test_images):
    session = onnxruntime.InferenceSession(str(onnx_exports["seed"].path), providers=["CPUExecutionProvider"])
    scaled = test_images[:4].numpy().astype(np.float32) / 255.0  # the classic mistake: preprocessing outside
    with pytest.raises(Exception, match=r"tensor\(float\).*expected.*tensor\(uint8\)"):
        session.run(None, {"images": scaled})
    with pytest.raises(Exception, match="invalid dimensions"):
        session.run(None, {"images": np.zeros((4, 1, 32, 32), dtype=np.uint8)})
    with pytest.raises(Exception, match="rank"):
        session.run(None, {"images": test_images[0, 0].numpy()})  # (28, 28): no batch or channel axis


@pytest.mark.parametrize("name", ["seed", "fast"])
def test_torchscript_round_trip_gives_the_same_top1_and_rejects_floats(runs, test_images, tmp_path, name):
    out = tmp_path / f"{name}.pt"
    result = export_run(runs[name], "torchscript", out=out, parity_images=PARITY_IMAGES)
    assert result.path == out and result.format == "torchscript" and result.images == PARITY_IMAGES
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
    loaded = torch.jit.load(str(out))
    with torch.inference_mode():
        got = loaded(test_images).numpy()
        assert loaded(test_images[:1]).shape == (1, 10)
    expected = _eager(runs[name], test_images)
    assert np.array_equal(got.argmax(1), expected.argmax(1))
    assert np.allclose(got.sum(1), 1.0, atol=1e-5)
    with pytest.raises(Exception, match="uint8"):
        loaded(test_images[:2].float())
    with pytest.raises(Exception, match=r"\(batch, 1, 28, 28\)"):
        loaded(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    assert load_torchscript_metadata(out)["classes"] == [str(d) for d in range(10)]


def test_default_paths_and_a_directory_as_out(runs, tmp_path):
    result = export_run(runs["fast"], "torchscript", parity_images=10)
    assert result.path == runs["fast"] / "model.torchscript.pt" and result.path.is_file()
    result = export_run(runs["fast"], "torchscript", out=tmp_path, parity_images=10)
    assert result.path == tmp_path / "model.torchscript.pt" and result.path.is_file()


def test_unloadable_dataset_falls_back_to_seeded_random_images_and_says_so(runs, tmp_path):
    result = export_run(runs["fast"], "onnx", out=tmp_path / "m.onnx", parity_images=20, data_dir=tmp_path / "empty")
    assert result.images == 20 and result.data.startswith("seeded random uint8 images")
    assert "mnist" in result.data and result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0


def test_unwritable_out_raises_and_leaves_nothing(runs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CnnkitError, match="a-file/model.onnx: cannot write the export.*choose another --out"):
        export_run(runs["seed"], "onnx", out=blocker / "model.onnx", parity_images=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"] and blocker.read_text() == "not a folder"


def _read_only_folder(tmp_path: Path) -> Path:
    """A folder no file can be created in: a chmod 555 one, or (root ignores modes) sysfs."""
    import tempfile

    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    try:
        os.close((made := tempfile.mkstemp(dir="/sys"))[0])
        os.unlink(made[1])
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only folder available to root here")


def test_read_only_folder_raises_and_leaves_nothing(runs, tmp_path):
    folder = _read_only_folder(tmp_path)
    before = sorted(os.listdir(folder))
    try:
        for fmt in ("onnx", "torchscript"):
            with pytest.raises(CnnkitError, match=f"{folder}/model.out: cannot write the export"):
                export_run(runs["seed"], fmt, out=folder / "model.out", parity_images=10)
            assert sorted(os.listdir(folder)) == before
    finally:
        if folder != Path("/sys"):
            folder.chmod(0o755)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_failed_parity_removes_the_export_and_keeps_an_earlier_file(runs, tmp_path, monkeypatch, fmt):
    import cnnkit.export

    earlier = tmp_path / "keep" / "model.bin"
    earlier.parent.mkdir()
    earlier.write_bytes(b"an earlier good export")
    monkeypatch.setattr(cnnkit.export, "compare", lambda expected, candidate, images, batch_size: (0.5, 0.9))
    with pytest.raises(CnnkitError, match=r"does not match PyTorch on 10 mnist test images.*nothing was written"):
        export_run(runs["seed"], fmt, out=earlier, parity_images=10)
    assert earlier.read_bytes() == b"an earlier good export"
    assert [p.name for p in earlier.parent.iterdir()] == ["model.bin"]  # no temporary file left either
    with pytest.raises(CnnkitError, match="does not match"):
        export_run(runs["seed"], fmt, out=tmp_path / "new" / "deeper" / "model.bin", parity_images=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # the folders it made are gone too


def test_missing_onnx_package_is_a_one_line_error_with_the_fix(runs, tmp_path, monkeypatch):
    message = missing_extra_message("onnxruntime")
    assert message == "onnxruntime is not installed; install the export extra: pip install 'cnnkit[export]'"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(CnnkitError) as error:
        export_run(runs["seed"], "onnx", out=tmp_path / "m.onnx", parity_images=10)
    assert str(error.value) == message and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []
    export_run(runs["seed"], "torchscript", out=tmp_path / "m.pt", parity_images=10)  # needs no extra


def test_bad_arguments_are_user_errors(runs):
    with pytest.raises(CnnkitError, match="unknown export format 'tflite'; choose one of onnx, torchscript"):
        export_run(runs["seed"], "tflite")
    with pytest.raises(CnnkitError, match="parity_images"):
        export_run(runs["seed"], "onnx", parity_images=0)
    with pytest.raises(CnnkitError, match="not a cnnkit run directory"):
        export_run(runs["seed"].parent, "onnx")
    weights = runs["seed"] / "model.safetensors"
    before = weights.read_bytes()
    with pytest.raises(CnnkitError, match="model.safetensors: is a file of the run in .*must not replace"):
        export_run(runs["seed"], "torchscript", out=weights, parity_images=10)
    assert weights.read_bytes() == before

"""Every shipped preset resolves, records what it was measured with, builds for its data, and trains a step.

The step is real: the preset's own options (optimizer, schedule, augmentation, TTA, ...) on a slice of
its real dataset; only the epoch count, batch size and data size are cut down. CIFAR-10 presets train on a
small folder of real CIFAR-10 JPEGs (the same data the accuracy benchmark uses), as `imagefolder:` data.
"""

from __future__ import annotations

import math

import pytest
import torch

from cnnkit import api
from cnnkit.config import list_presets, resolve_config
from cnnkit.data.registry import get_spec
from cnnkit.models import build_model
from slices import extract_cifar_subset

PRESETS = [preset.name for preset in list_presets()]
CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
STEP_IMAGES = 16  # one step: the batch size is cut to the whole (limited) training set


@pytest.fixture(scope="module")
def cifar_folder(shared_data, tmp_path_factory):
    """10 classes x 8 train / 4 test real CIFAR-10 JPEGs in the split layout imagefolder: reads."""
    root = tmp_path_factory.mktemp("cifar-slice") / "cifar10-jpg"
    return extract_cifar_subset(shared_data / "cifar10-jpg.tar.gz", root, CIFAR_CLASSES, {"train": 8, "test": 4})


def test_the_issue_presets_ship():
    assert {"mnist-best", "fashion-best", "cifar10-fast", "cifar10-best"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_resolves_and_records_its_measurement(name):
    config = resolve_config(preset=name)
    assert config.preset == name
    preset = next(p for p in list_presets() if p.name == name)
    assert preset.description
    for key in ("result", "command", "machine"):
        assert isinstance(preset.measured.get(key), str) and preset.measured[key].strip(), (name, key)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_model_builds_for_its_dataset(name):
    config = resolve_config(preset=name)
    spec = get_spec(config.dataset)
    model = build_model(config.model, spec.shape, len(spec.classes), **config.model_kwargs).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, *spec.shape, dtype=torch.uint8))
    assert logits.shape == (2, len(spec.classes))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_one_step_on_real_data(name, shared_data, tmp_path, request):
    config = resolve_config(preset=name)
    writable = tmp_path / "data"  # what a run writes under DATA_DIR (converted ImageNet weights) stays out of shared/
    writable.mkdir()
    for folder in shared_data.iterdir():
        (writable / folder.name).symlink_to(folder)
    data = ({"dataset": f"imagefolder:{request.getfixturevalue('cifar_folder')}"} if config.dataset == "cifar10"
            else {"data_dir": str(writable)})
    result = api.train(preset=name, epochs=1, batch_size=STEP_IMAGES, limit_train=STEP_IMAGES, limit_eval=64,
                       threads=1, progress=False, runs_dir=str(tmp_path), name="step", **data)
    metrics = result.metrics
    assert metrics["preset"] == name and metrics["model"] == config.model
    assert metrics["num_train"] == STEP_IMAGES and metrics["epochs"] == 1
    assert result.history.steps["step"] == [1]  # exactly one optimizer step
    assert math.isfinite(result.history.history["loss"][0])
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    # the preset's test-time augmentation was applied to the test score; auto: the mirror only where training mirrored
    assert metrics["tta"] == (config.tta if config.tta != "auto" else "flip" if metrics["flip"] else "none")
    assert (result.run_dir / "model.safetensors").is_file()

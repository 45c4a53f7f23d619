"""Why a model decided: Grad-CAM maps (cnnkit.explain, `cnnkit predict --explain`) of a real trained run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import cnnkit
from slices import SHARED_DATA

pytest.importorskip("captum", reason='needs Captum: pip install "cnnkit[insight]"')


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = root / "data"
    data.mkdir()
    (data / "mnist").symlink_to(SHARED_DATA / "mnist")
    result = subprocess.run([sys.executable, "-m", "cnnkit", "train", "--data-dir", str(data), "--limit-train",
                             "4000", "--limit-eval", "500", "--epochs", "2", "--model", "seed", "--quiet",
                             "--no-checkpoint", "--runs-dir", str(root / "runs"), "--name", "s"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return root / "runs" / "s", data


def test_explain_gives_a_map_per_image_that_follows_the_weights_and_the_class(run):
    run_dir, data = run
    loaded = cnnkit.load_run(run_dir)
    images = cnnkit.load_dataset("mnist", str(data), limit_eval=16, progress=False).test.images
    maps = cnnkit.explain(loaded.model, images)
    assert maps.shape == (16, 28, 28) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.allclose(maps.reshape(16, -1).max(1)[maps.reshape(16, -1).max(1) > 0], 1.0)
    assert np.array_equal(maps, cnnkit.explain(loaded.model, images))  # the same model and images, the same maps
    from cnnkit.models.tta import with_tta

    assert np.array_equal(maps, cnnkit.explain(with_tta(loaded.model, "flip"), images))  # the image, not its mirror
    predicted = cnnkit.predict(loaded.model, images).argmax(1)
    other = [(int(label) + 1) % 10 for label in predicted]
    assert np.abs(cnnkit.explain(loaded.model, images, other) - maps).mean() > 0.05  # another class, other evidence
    # The model-randomisation check (Adebayo et al., 2018): maps of the same network with fresh weights differ.
    fresh = cnnkit.build_model("seed", (1, 28, 28), 10, seed=1)
    assert np.abs(cnnkit.explain(fresh, images) - maps).mean() > 0.1


def test_predict_explain_writes_a_heatmap_picture_per_image_and_refuses_a_run_directory(run, tmp_path):
    run_dir, data = run
    digits = tmp_path / "digits"
    sampled = subprocess.run([sys.executable, "-m", "cnnkit", "datasets", "sample", "mnist", str(digits),
                              "--data-dir", str(data), "--count", "6"], capture_output=True, text=True, timeout=120)
    assert sampled.returncode == 0, sampled.stderr
    why = tmp_path / "why"
    result = subprocess.run([sys.executable, "-m", "cnnkit", "predict", str(run_dir), str(digits), "--explain",
                             str(why)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pictures = sorted(why.iterdir())
    assert len(pictures) == 6 == len(result.stdout.splitlines())
    with Image.open(pictures[0]) as picture:
        assert picture.format == "PNG" and picture.size == (224, 244)
        heat = np.asarray(picture.convert("RGB"))[20:].astype(int)
    assert (heat[..., 0] - heat[..., 2]).std() > 10  # a coloured map over the digit, not a plain copy of it
    refused = subprocess.run([sys.executable, "-m", "cnnkit", "predict", str(run_dir), str(digits), "--explain",
                              str(run_dir)], capture_output=True, text=True, timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode != 0 and len(lines) == 1 and "--explain" in lines[0] and "is a run directory" in lines[0]

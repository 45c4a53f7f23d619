"""Photos of handwritten digits are brought to MNIST's own layout, and a model is as right on them as on MNIST.

The photos come from tests/photos.py: real MNIST test digits written as dark ink on textured off-white
paper, 4-7x larger than MNIST's box, off-centre, rotated up to 8 degrees, blurred, unevenly lit, RGB JPEG.
"""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.digit_layout import BOX, is_mnist_layout, to_mnist_layout
from cnnkit.data.tensors import load_dataset
from photos import photograph
from processes import run_cnnkit
from slices import SHARED_DATA, mnist_dataset

PHOTOS = 1000  # a gap of one point is ten digits: fewer would measure noise


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(image.shape)
    total = image.sum()
    return (image * rows).sum() / total, (image * cols).sum() / total


def test_a_photo_becomes_the_digit_it_was_made_from():
    test = mnist_dataset(limit_train=100, limit_eval=50).test
    rng = np.random.default_rng(0)
    for digit in test.images[:20, 0].numpy():
        photo = np.asarray(Image.open(io.BytesIO(photograph(digit, rng))).convert("L"))
        seen = to_mnist_layout(photo)
        assert seen.shape == (28, 28) and seen.dtype == np.uint8 and seen[0].max() < 30  # light ink on black
        rows, cols = np.nonzero(seen > 30)
        assert max(np.ptp(rows), np.ptp(cols)) + 1 <= BOX + 2  # fitted to MNIST's 20x20 box
        assert np.allclose(centre_of_mass(seen.astype(float)), (13.5, 13.5), atol=1.0)
        correlation = np.corrcoef(seen.ravel().astype(float), digit.ravel().astype(float))[0, 1]
        assert correlation > 0.5, correlation  # the same strokes where MNIST has them (rotation and blur aside)


def test_the_layout_is_recognised_in_training_data():
    assert is_mnist_layout(mnist_dataset(limit_train=1000, limit_eval=100).train.images.numpy())
    fashion = load_dataset("fashion-mnist", str(SHARED_DATA), limit_train=1000, limit_eval=100, progress=False)
    assert not is_mnist_layout(fashion.train.images.numpy())  # clothes fill the frame: no digit recipe
    assert not is_mnist_layout(np.zeros((10, 3, 32, 32), np.uint8))


@pytest.fixture(scope="module")
def digit_folders(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """The same MNIST test digits as PNG files and as photos, in two folders."""
    root = tmp_path_factory.mktemp("digits")
    test = mnist_dataset(limit_train=100, limit_eval=10000).test
    rng = np.random.default_rng(0)
    labels = []
    for folder in ("plain", "photos"):
        (root / folder).mkdir()
    for i in range(PHOTOS):
        digit = test.images[i, 0].numpy()
        Image.fromarray(digit).save(root / "plain" / f"{i:04d}.png")
        (root / "photos" / f"{i:04d}.jpg").write_bytes(photograph(digit, rng))
        labels.append(str(int(test.labels[i])))
    return root / "plain", root / "photos", labels


def accuracy(run: Path, folder: Path, labels: list[str], show: Path | None = None) -> float:
    extra = ["--show-input", str(show)] if show else []
    out = run_cnnkit("predict", str(run), str(folder), "--json", *extra, check=True).stdout
    items = json.loads(out)
    assert [Path(item["file"]).stem for item in items] == [f"{i:04d}" for i in range(len(labels))]
    return float(np.mean([item["label"] == label for item, label in zip(items, labels)]))


def train_digits(runs: Path, name: str, *options: str) -> Path:
    run_cnnkit("train", "--data-dir", str(SHARED_DATA), "--runs-dir", str(runs),
               "--name", name, "--quiet", "--no-checkpoint", *options, check=True)
    assert json.loads((runs / name / "model.json").read_text())["preprocessing"]["layout"] == "mnist"
    return runs / name


@pytest.mark.slow
def test_photos_of_digits_score_within_a_point_of_the_original_images(digit_folders, tmp_path):
    """A model trained with small shifts and rotations (what a photographed digit adds to MNIST's own
    variation) is as right on photos as on MNIST's images."""
    plain, photos, labels = digit_folders
    robust = train_digits(tmp_path / "runs", "robust", "--preset", "fast", "--epochs", "3",
                          "--augment", "shift=2,affine=10", "--limit-train", "20000")  # a third of MNIST: the suite's time
    original = accuracy(robust, plain, labels)
    photographed = accuracy(robust, photos, labels, show=tmp_path / "seen")
    # Measured on these 1,000 digits: 98.8% plain, 98.7% photos (gap 0.1 points; 99.1% and 99.1% trained on all
    # 60,000 digits, 2026-12-06). The photos' rotation (up to 8 degrees) is what --augment affine=10 teaches; a
    # plain resize of the photos scores 36.0% (seed model).
    assert original >= 0.98 and photographed >= original - 0.01, (original, photographed)
    # The tutorial's seed model, trained without the augmentation, is near: 98.8% plain, 97.8% photos after 2 epochs
    # (1.0 point; after 1 epoch 98.4% and 96.7%). Measured by this test until 2026-12-05, when its 45 s of training
    # (on one core) went to keep the suite within its time.
    seen = np.asarray(Image.open(tmp_path / "seen" / "0000.png"))
    assert seen.shape == (28, 28) and seen[:3].max() < 30  # --show-input wrote what the model saw

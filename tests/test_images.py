"""The shared image decoder and extension list: folder datasets and prediction accept the same files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cnnkit.data.folder import load_image_folder
from cnnkit.data.images import IMAGE_EXTENSIONS, decode_image
from cnnkit.prediction import expand_image_paths
from slices import mnist_dataset

FORMAT_OF = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP", ".gif": "GIF",
             ".tif": "TIFF", ".tiff": "TIFF"}


def _digits(count: int) -> np.ndarray:
    """`count` real MNIST digits as uint8 (28, 28) arrays."""
    return mnist_dataset(limit_train=2000).train.images[:count, 0].numpy()


def test_every_extension_has_a_known_format() -> None:
    assert set(FORMAT_OF) == IMAGE_EXTENSIONS  # a new extension needs a case in the tests below


def test_prediction_and_folders_accept_exactly_the_same_files(tmp_path: Path) -> None:
    root = tmp_path / "digits"
    suffixes = [*sorted(IMAGE_EXTENSIONS), *(suffix.upper() for suffix in sorted(IMAGE_EXTENSIONS))]
    digits = iter(_digits(2 * len(suffixes) + 2))
    for name in ("one", "two"):
        (root / name).mkdir(parents=True)
        for index, suffix in enumerate(suffixes):
            Image.fromarray(next(digits), "L").save(root / name / f"{index}{suffix}", FORMAT_OF[suffix.lower()])
        # A real image behind a non-image extension: accepting it would change the counts, not only `skipped`.
        Image.fromarray(next(digits), "L").save(root / name / "digit.txt", "PNG")
        (root / name / "notes.txt").write_text("not an image")

    expanded = expand_image_paths([root])
    assert {path.suffix for path in expanded} == set(suffixes)
    assert len(expanded) == 2 * len(suffixes)

    data = load_image_folder(root, None, image_size=(28, 28), channels=1, workers=1)
    assert data.skipped == []
    labels = np.concatenate([labels for _, labels in data.splits.values()])
    assert len(labels) == len(expanded)
    assert np.bincount(labels).tolist() == [len(suffixes), len(suffixes)]


def test_lossless_formats_decode_to_the_saved_pixels(tmp_path: Path) -> None:
    digit = _digits(1)[0]
    for suffix in (".png", ".bmp", ".gif", ".tif"):
        Image.fromarray(digit, "L").save(tmp_path / f"digit{suffix}")
        decoded = decode_image(tmp_path / f"digit{suffix}", (28, 28), 1)
        np.testing.assert_array_equal(decoded, digit[None], err_msg=suffix)
        colour = decode_image(tmp_path / f"digit{suffix}", (28, 28), 3)
        np.testing.assert_array_equal(colour, np.repeat(digit[None], 3, axis=0), err_msg=suffix)

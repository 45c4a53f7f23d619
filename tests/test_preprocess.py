"""What model.json records about inputs, and applying it to new images, on real MNIST digits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.errors import CnnkitError
from cnnkit.inputs import InputSpec, Preprocessing
from cnnkit.preprocess import load_image, preprocessing_meta
from slices import mnist_dataset

DIGIT_INPUT = InputSpec(1, 28, 28)
DIGIT_STEPS = Preprocessing(mean=(33.3,), std=(78.6,), background="dark")


def _digits() -> np.ndarray:
    return mnist_dataset(limit_train=2000).train.images.numpy()


def test_preprocessing_meta_records_the_dark_background_of_digits() -> None:
    digits = _digits()
    meta = preprocessing_meta(1, np.array([33.3], np.float32), [78.6], digits)
    assert meta == {"color_mode": "L", "resize": "bilinear", "mean": [pytest.approx(33.3)], "std": [78.6],
                    "background": "dark", "layout": "mnist"}
    assert json.loads(json.dumps(meta))["mean"] == meta["mean"]  # numpy values stored as plain floats
    inverted = preprocessing_meta(3, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], np.repeat(255 - digits, 3, axis=1))
    assert (inverted["color_mode"], inverted["background"], inverted["layout"]) == ("RGB", "light", None)


def test_ink_on_paper_photo_is_inverted_to_match_the_training_digits(tmp_path: Path) -> None:
    digit = _digits()[0, 0]
    Image.fromarray(255 - digit, "L").save(tmp_path / "paper.png")
    np.testing.assert_array_equal(load_image(tmp_path / "paper.png", DIGIT_INPUT, DIGIT_STEPS), digit[None])
    # Same background as training, or a model with no recorded background: the pixels are left alone.
    Image.fromarray(digit, "L").save(tmp_path / "screen.png")
    np.testing.assert_array_equal(load_image(tmp_path / "screen.png", DIGIT_INPUT, DIGIT_STEPS), digit[None])
    no_background = Preprocessing(mean=(33.3,), std=(78.6,), background=None)
    np.testing.assert_array_equal(load_image(tmp_path / "paper.png", DIGIT_INPUT, no_background), 255 - digit[None])


def test_unreadable_file_names_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CnnkitError, match="broken.png: not a readable image"):
        load_image(broken, DIGIT_INPUT, DIGIT_STEPS)


def test_preprocess_and_progress_do_not_import_torch() -> None:
    code = "import sys, cnnkit.preprocess, cnnkit.progress, cnnkit.data.images; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"

"""What model.json records about a model's inputs, and applying that record to a new image.

Training writes the record (`preprocessing_meta`) and prediction applies it (`load_image`); keeping both
sides here means neither imports the other, and a change to one is made next to the other. An image file
of any size or mode is decoded with the same function that decodes folder datasets (orientation, mode,
bilinear resize), then, when the model was trained on light-on-dark images (MNIST-style) and the photo is
dark-on-light (ink on paper), inverted. No torch: recording and applying this needs only numpy and Pillow.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from cnnkit.data.digit_layout import WORK_SIDE, is_mnist_layout, to_mnist_layout
from cnnkit.data.images import DECODE_ERRORS, ImageRefused, decode_image, decode_within
from cnnkit.errors import CnnkitError
from cnnkit.inputs import InputSpec, Preprocessing

__all__ = ["CONSISTENT_BACKGROUND", "background_of", "border_means", "load_image", "preprocessing_meta"]

#: Share of training images that must agree on a background before prediction inverts photos to match.
CONSISTENT_BACKGROUND = 0.95


def preprocessing_meta(channels: int, mean: Sequence[float], std: Sequence[float], sample: np.ndarray) -> dict:
    """model.json's "preprocessing" record: how a new image must be converted to match the training data.

    `mean` and `std` are the model's per-channel standardisation in pixel units; `sample` is uint8
    (N, C, H, W) training images, from which the shared background (if any) is measured.
    """
    return {
        "color_mode": "L" if channels == 1 else "RGB",
        "resize": "bilinear",
        "mean": [float(value) for value in mean],
        "std": [float(value) for value in std],
        "background": background_of(sample),
        # "mnist": the training images are in MNIST's layout (ink in a 20x20 box centred by mass in 28x28),
        # so a photo is brought to that layout (data/digit_layout.py) instead of being resized whole.
        "layout": "mnist" if channels == 1 and is_mnist_layout(sample) else None,
    }


def border_means(images: np.ndarray) -> np.ndarray:
    """Per-image mean of the outermost pixel ring of (N, C, H, W) images: each one's background brightness."""
    ring = np.concatenate([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], axis=-1)
    return ring.reshape(len(images), -1).mean(axis=1)


def background_of(images: np.ndarray) -> str | None:
    """'dark' or 'light' when (nearly) every image shares it, as in MNIST-style data; else None.

    Recorded in model.json so prediction can invert ink-on-paper photos for a light-on-dark model. Natural
    photos (CIFAR) have no common background, and inverting those by their border would corrupt them.
    """
    dark = float((border_means(images) < 128).mean())
    if dark >= CONSISTENT_BACKGROUND:
        return "dark"
    if dark <= 1 - CONSISTENT_BACKGROUND:
        return "light"
    return None


def load_image(source: str | Path | BinaryIO | Image.Image, spec: InputSpec, steps: Preprocessing,
               name: str | None = None) -> np.ndarray:
    """One image (a path, a binary file object or a PIL image) as uint8 (C, H, W), preprocessed as the
    model's metadata (model.json: its `input` and `preprocessing`) says; unreadable input is a CnnkitError
    naming `name` (default: the path).
    """
    size, channels = (spec.height, spec.width), spec.channels
    try:
        if steps.layout == "mnist":
            array = _digit_photo(source, size)
        else:
            array = decode_image(source, size, channels)
    except ImageRefused as error:  # the policy's own refusal says what and why
        label = name or (source if isinstance(source, (str, Path)) else "image")
        raise CnnkitError(f"{label}: not a readable image ({error})") from None
    except DECODE_ERRORS as error:  # unreadable, corrupt or hostile
        label = name or (source if isinstance(source, (str, Path)) else "image")
        raise CnnkitError(f"{label}: not a readable image ({type(error).__name__}: {error})") from None
    background = steps.background
    if background is not None and background_of(array[None]) not in (background, None):
        array = 255 - array
    return array


def _digit_photo(source, size: tuple[int, int]) -> np.ndarray:
    """An image for an MNIST-layout model: as it is when it already has that layout (a dataset image),
    else brought to it (crop to the ink, fit 20x20, centre by mass)."""
    gray = decode_within(source, WORK_SIDE * 2, 1)[0]
    if gray.shape == size and border_means(gray[None, None])[0] < 128 and is_mnist_layout(gray[None, None]):
        return gray[None]
    return to_mnist_layout(gray)[None]

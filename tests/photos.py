"""MNIST digits as a person would photograph them: dark ink on textured off-white paper, in colour, larger
than MNIST's box, off-centre, slightly rotated and blurred, unevenly lit, saved as JPEG."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

CANVAS = 200


def photograph(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """JPEG bytes of one uint8 (28, 28) light-on-dark MNIST digit written on paper and photographed."""
    rows, cols = np.nonzero(digit > 0)
    crop = digit[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    scale = rng.uniform(4.0, 7.0)  # the digit ends 80-140 px tall: bigger than MNIST's 20 px box
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    ink = Image.fromarray(crop).resize(size, Image.Resampling.BICUBIC)
    ink = ink.rotate(rng.uniform(-8, 8), resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0)
    ink = ink.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.4)))
    alpha = np.zeros((CANVAS, CANVAS), np.float32)
    height, width = min(ink.height, CANVAS), min(ink.width, CANVAS)
    top = int(rng.integers(0, CANVAS - height + 1))
    left = int(rng.integers(0, CANVAS - width + 1))
    alpha[top : top + height, left : left + width] = np.asarray(ink, np.float32)[:height, :width] / 255
    paper = np.array([238, 232, 218], np.float32) * rng.uniform(0.85, 1.0)
    light = np.linspace(rng.uniform(0.8, 0.9), 1.0, CANVAS, dtype=np.float32)  # uneven lighting across the page
    light = light[None, :, None] if rng.random() < 0.5 else light[:, None, None]
    page = paper * light + rng.normal(0, 5, (CANVAS, CANVAS, 3)).astype(np.float32)  # paper grain
    pen = np.array([35, 35, 70], np.float32)
    pixels = page * (1 - alpha[..., None]) + pen * alpha[..., None]
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(out, "JPEG", quality=int(rng.integers(60, 92)))
    return out.getvalue()

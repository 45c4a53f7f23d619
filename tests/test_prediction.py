"""Matching a photo's background to the training data's, only where the training data has one."""

import numpy as np
from PIL import Image

from cnnkit.preprocess import background_of
from slices import SHARED_DATA, extract_cifar_subset, mnist_dataset


def test_digits_have_a_dark_background_and_natural_photos_none(tmp_path):
    digits = mnist_dataset(limit_train=2000).train.images.numpy()
    assert background_of(digits) == "dark"
    assert background_of(255 - digits) == "light"
    folder = extract_cifar_subset(SHARED_DATA / "cifar10-jpg.tar.gz", tmp_path, ("airplane", "frog"), {"train": 100})
    photos = np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1)
                       for p in sorted(folder.glob("train/*/*.jpg"))])
    assert background_of(photos) is None  # mixed backgrounds: prediction must not invert photos

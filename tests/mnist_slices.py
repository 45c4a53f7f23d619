"""Small, seeded slices of the real MNIST files, shared by the engine and CLI tests."""

from __future__ import annotations

import functools
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@functools.cache
def mnist_dataset(limit_train: int = 4000, limit_eval: int = 1000):
    """A cnnkit Dataset of real MNIST images: `limit_train` training images, `limit_eval` val and test."""
    from cnnkit.data.tensors import load_dataset

    return load_dataset("mnist", str(SHARED_DATA), limit_train=limit_train, limit_eval=limit_eval, progress=False)

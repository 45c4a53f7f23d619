"""Build a registered architecture inside its ImageClassifier wrapper."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cnnkit.models.classifier import ImageClassifier
from cnnkit.models.registry import ModelEntry, get_entry


def model_entry(name: str) -> ModelEntry:
    """The registry entry for `name` (builder, description, whether it standardises its input)."""
    return get_entry(name)


def build_model(
    name: str = "seed",
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int | None = 0,
    **kwargs,
) -> ImageClassifier:
    """A fresh model by registry name for images of `input_shape` (C, H, W) and `num_classes` classes.

    Without `mean`/`std` the input is scaled to [0, 1] (the tutorial's x / 255); pass the training
    set's per-channel statistics (pixel units) to standardise instead. The initial weights are drawn
    from `seed` (default 0, the CLI's default) without touching the global random state, so two identical
    scripts build identical models; `seed=None` draws from the global generator instead.
    """
    entry = get_entry(name)
    shape = tuple(int(v) for v in input_shape)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        body = entry.builder(input_shape=shape, num_classes=num_classes, **kwargs)
    mean = list(mean) if mean is not None else [0.0] * shape[0]
    std = list(std) if std is not None else [255.0] * shape[0]
    model = ImageClassifier(body, mean, std)
    model.architecture, model.model_kwargs, model.input_shape = name, dict(kwargs), shape
    return model

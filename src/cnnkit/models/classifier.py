"""The wrapper every model trains and ships in: uint8 pixels in, class logits out.

Normalisation lives inside the model (as Keras's Rescaling layer does), with its constants saved in
the weights file, so prediction, export and serving all apply exactly what training applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Rescaling(nn.Module):
    """(x - mean) / std per channel, with mean and std in pixel units (0-255); no trainable weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]  # exact, for model.json
        scale = 1.0 / torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("offset", (-torch.tensor(mean, dtype=torch.float32) * scale).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale + self.offset


class ImageClassifier(nn.Module):
    """Rescaling followed by a network body; `forward` takes uint8 or float images in pixel units."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.rescale = Rescaling(mean, std)
        self.body = body
        # What build_model made it from: enough to describe it in model.json and to summarise it.
        self.architecture: str | None = None
        self.model_kwargs: dict = {}
        self.input_shape: tuple[int, int, int] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.rescale(images))

    def summary(self, input_shape: Sequence[int] | None = None):
        """Keras's `model.summary()`: the layer table (printable; shown as the value in a notebook)."""
        from cnnkit.models.summary import summary

        return summary(self, input_shape)

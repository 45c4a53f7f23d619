"""The typed records of what a model takes: model.json's `input` and `preprocessing`, as the code reads them.

Their own module, free of numpy and torch, because both sides use them: `model_meta` checks model.json into
them (and `cnnkit report` must not import numpy), `preprocess` applies them to a new image.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["InputSpec", "Preprocessing"]


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: uint8 images of this many channels, rows and columns (N x C x H x W)."""

    channels: int  # 1 (grayscale) or 3 (RGB)
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.channels, self.height, self.width

    def text(self) -> str:
        return f"{self.channels}x{self.height}x{self.width}"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: the standardisation the network applies inside itself, and
    what a photo needs before it (`layout` "mnist": a photographed digit centred as MNIST's are)."""

    mean: tuple[float, ...]  # one per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    background: str | None = None  # "dark" or "light": the training images' background, when consistent
    layout: str | None = None  # "mnist" or None

"""Batch augmentations as whole-batch tensor ops on the training device (no per-image Python)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift], zero-filling the border.

    One gather over a padded batch: the index grids are offset per image, so the cost is a copy.
    """
    n, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(images.device)
    rows = (torch.arange(height, device=images.device).view(1, -1) + offsets[0].view(-1, 1))
    cols = (torch.arange(width, device=images.device).view(1, -1) + offsets[1].view(-1, 1))
    batch = torch.arange(n, device=images.device).view(-1, 1, 1, 1)
    channel = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return padded[batch, channel, rows.view(n, 1, height, 1), cols.view(n, 1, 1, width)]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (for natural images, never for digits)."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(3), images)


def augment_batch(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Apply the named augmentation: 'none', 'shift' (±2 px) or 'flip-crop' (flip + ±4 px, CIFAR-style)."""
    if kind == "none":
        return images
    if kind == "shift":
        return random_shift(images, 2, generator)
    if kind == "flip-crop":
        return random_shift(random_flip(images, generator), 4, generator)
    raise ValueError(f"unknown augmentation {kind!r}")

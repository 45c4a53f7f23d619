"""Batch augmentations as whole-batch tensor ops on the training device (no per-image Python).

Each named augmentation is one registered function `(uint8 images, generator) -> images`; the option
schema takes its allowed `--augment` names from AUGMENTATIONS.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from cnnkit.registry import Registry

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")


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


@AUGMENTATIONS.register("none")
def no_augmentation(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return images


@AUGMENTATIONS.register("shift")
def shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """±2 px translation: digits stay digits, and MNIST's 4-px border leaves room."""
    return random_shift(images, 2, generator)


@AUGMENTATIONS.register("flip-crop")
def flip_crop(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror plus ±4 px translation, the CIFAR recipe (natural images only)."""
    return random_shift(random_flip(images, generator), 4, generator)


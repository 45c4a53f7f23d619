"""Mixup and cutmix: each training batch blended with a shuffled copy of itself, labels mixed in the loss.

Mixup (Zhang et al. 2018) averages two images pixel by pixel; cutmix (Yun et al. 2019) pastes a box of one
into the other. Either way the step's loss becomes lam * CE(logits, labels) + (1 - lam) * CE(logits,
partner labels), so the labels themselves are never changed. One lam per batch, drawn from Beta(alpha,
alpha) (cutmix: corrected to the pasted box's true area), as the papers' reference code does. They help
long trainings of large nets (the Fashion-MNIST and CIFAR tables' best entries) and slow short ones down.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

#: (images, labels, generator) -> (mixed images, partner labels, lam)
Mix = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor, float]]
MIX_CHOICES = ("none", "mixup", "cutmix")


def _beta(alpha: float, generator: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw, seeded from the torch generator (torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _partners(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(len(labels), generator=generator).to(labels.device)


def no_mix(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
    return images, labels, 1.0


def mixup(alpha: float) -> Mix:
    """Every image blended with a partner as lam * image + (1 - lam) * partner (uint8, rounded)."""

    def mix(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        lam, order = _beta(alpha, generator), _partners(labels, generator)
        blended = images.float().mul_(lam).add_(images[order].float(), alpha=1 - lam)
        return blended.round_().to(images.dtype), labels[order], lam

    return mix


def cutmix(alpha: float) -> Mix:
    """One box of area about (1 - lam) of the image, at a random centre (clipped to the image), pasted from
    each image's partner; lam is then the share of the image left unpasted."""

    def mix(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        _, _, height, width = images.shape
        lam, order = _beta(alpha, generator), _partners(labels, generator)
        cut = (1 - lam) ** 0.5
        centre_y = int(torch.randint(0, height, (1,), generator=generator))
        centre_x = int(torch.randint(0, width, (1,), generator=generator))
        top, bottom = max(0, centre_y - round(cut * height / 2)), min(height, centre_y + round(cut * height / 2))
        left, right = max(0, centre_x - round(cut * width / 2)), min(width, centre_x + round(cut * width / 2))
        mixed = images.clone()
        mixed[:, :, top:bottom, left:right] = images[order][:, :, top:bottom, left:right]
        return mixed, labels[order], 1 - (bottom - top) * (right - left) / (height * width)

    return mix


def make_mix(kind: str, alpha: float) -> Mix:
    """The Mix the options `mix` and `mix_alpha` name."""
    if kind == "mixup":
        return mixup(alpha)
    if kind == "cutmix":
        return cutmix(alpha)
    return no_mix


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partners: torch.Tensor, lam: float,
                        label_smoothing: float = 0.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """lam * CE(labels) + (1 - lam) * CE(partners); plain cross-entropy when nothing was mixed (lam 1).
    `weight`: a loss weight per class (--class-weight balanced)."""
    loss = _cross_entropy(logits, labels, label_smoothing, weight)
    if lam == 1.0:
        return loss
    return lam * loss + (1 - lam) * _cross_entropy(logits, partners, label_smoothing, weight)


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float,
                   weight: torch.Tensor | None) -> torch.Tensor:
    """The batch's mean cross-entropy, each image's weighted by its class's `weight` when given. A mean over
    images, not PyTorch's weighted mean (divided by the batch's sum of weights): micro-batches and data-parallel
    ranks then add up to the same step as one whole batch, as they do unweighted."""
    if weight is None:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    losses = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    return (weight[labels] * losses).mean()

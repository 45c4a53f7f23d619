"""Class imbalance: measuring it, and the two ways training can answer it (loss weights, balanced draws).

A folder of a user's own photos is rarely balanced: one class with ten times the images of another teaches a
network that the rare class hardly matters, and plain accuracy hides it (predicting only the common classes
scores well). cnnkit says when the training classes differ by more than IMBALANCED to 1, reports balanced
accuracy and macro-F1 beside accuracy, and offers the two standard remedies, measured against each other in
benchmarks/imbalance.py:

- `--class-weight balanced`: each image's loss is weighted by N / (K x n_class) (scikit-learn's and Keras's
  "balanced"), so every class contributes the same total weight to an epoch;
- `--sampler balanced`: each epoch draws N images with replacement, each class with probability 1/K, so
  every batch sees the rare classes as often as the common ones (their images repeat within an epoch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["IMBALANCED", "Imbalance", "balanced_class_weights", "balanced_order", "class_counts", "imbalance_of"]

#: Largest over smallest class count above which a training set is called imbalanced (the issue's 2:1).
IMBALANCED = 2.0
#: Images per class, on average, below which no imbalance is called: the class counts of a random sample of a
#: balanced dataset differ by more than 2:1 by chance in 46% of samples of 20 images a class (10 classes), 19%
#: at 30 and 2.3% at 50 (20,000 multinomial draws); a 200-image slice of MNIST is not an imbalanced dataset.
MIN_PER_CLASS = 50


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Images per class (int64, length num_classes)."""
    return torch.bincount(labels.to("cpu", torch.int64), minlength=num_classes)


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Loss weight per class, N / (K x n_c), for the classes present (a class with no image weighs 0)."""
    counts = class_counts(labels, num_classes).double()
    present = counts > 0
    weights = torch.zeros(num_classes, dtype=torch.float64)
    weights[present] = counts.sum() / (int(present.sum()) * counts[present])
    return weights.float()


def balanced_order(labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One epoch's draw: len(labels) indices, with replacement, each present class equally likely and the
    images of a class equally likely within it. Drawn from `generator`, so every rank of a data-parallel run
    draws the same order and a resumed run continues the same sequence."""
    counts = class_counts(labels, int(labels.max()) + 1 if len(labels) else 0).double()
    per_image = (1.0 / counts)[labels.to("cpu", torch.int64)]
    return torch.multinomial(per_image, len(labels), replacement=True, generator=generator)


@dataclass(frozen=True)
class Imbalance:
    """How uneven a training set's classes are: largest over smallest count, and the rare classes (fewer than
    half the images of the largest class), rarest first."""

    ratio: float
    rare: tuple[str, ...]

    def text(self) -> str:
        shown = ", ".join(self.rare[:8]) + (" ..." if len(self.rare) > 8 else "")
        return f"{self.ratio:.1f}:1 (rare: {shown})"


def imbalance_of(labels: torch.Tensor, classes: Sequence[str]) -> Imbalance | None:
    """The Imbalance of a split's labels when its classes differ by more than IMBALANCED to 1, and it has
    MIN_PER_CLASS images a class on average (else chance could make the difference), else None."""
    counts = class_counts(labels, len(classes)).tolist()
    present = [(count, name) for count, name in zip(counts, classes) if count > 0]
    if len(present) < 2 or sum(counts) < MIN_PER_CLASS * len(present):
        return None
    largest, smallest = max(count for count, _ in present), min(count for count, _ in present)
    if largest <= IMBALANCED * smallest:
        return None
    rare = tuple(name for count, name in sorted(present, key=lambda item: item[0]) if 2 * count < largest)
    return Imbalance(largest / smallest, rare)

"""Metrics on a labelled split: loss, accuracy, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.data.tensors import Split
from cnnkit.engine.distributed import World, all_gather, broadcast_buffers
from cnnkit.engine.inference import predict_logits


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of an accuracy measured on `total` images (Wilson score interval).

    A test set is a finite sample: on 10,000 images a 99.0% accuracy is only known to about +-0.2 points,
    and two runs closer than that are not told apart by it. Wilson's interval stays inside [0, 1] and is
    sound near 100%, where the textbook normal interval is not.
    """
    if total == 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(repr=False)
class EvalReport:
    loss: float
    accuracy: float
    classes: list[str]
    confusion: torch.Tensor  # (K, K) int64: rows true class, columns predicted class
    precision: list[float]
    recall: list[float]
    f1: list[float]
    support: list[int]
    predictions: torch.Tensor  # (N,) predicted class per image
    confidences: torch.Tensor  # (N,) probability of the predicted class

    @property
    def balanced_accuracy(self) -> float:
        """The mean of the per-class recalls (over the classes the test set has): the accuracy the model would
        score if every class had as many test images; what plain accuracy hides when classes are imbalanced."""
        recalls = [recall for recall, support in zip(self.recall, self.support) if support > 0]
        return sum(recalls) / max(1, len(recalls))

    @property
    def macro_f1(self) -> float:
        return sum(self.f1) / max(1, len(self.f1))

    @property
    def accuracy_ci95(self) -> tuple[float, float]:
        total = int(self.confusion.sum())
        return wilson_interval(int(self.confusion.diag().sum()), total)

    def most_confused(self, count: int = 3) -> list[tuple[str, str, int]]:
        """The `count` largest off-diagonal cells: (true class, predicted class, images), most first."""
        off = self.confusion.clone()
        off.fill_diagonal_(0)
        values, flat = off.flatten().sort(descending=True)
        k = len(self.classes)
        return [(self.classes[i // k], self.classes[i % k], int(v))
                for v, i in zip(values[:count].tolist(), flat[:count].tolist()) if v > 0]

    def __repr__(self) -> str:
        low, high = self.accuracy_ci95
        return (f"EvalReport(accuracy={self.accuracy:.4f} (95% CI {low:.4f}-{high:.4f}), loss={self.loss:.4f}, "
                f"{len(self.classes)} classes, {int(self.confusion.sum()):,} images)")

    def to_dict(self) -> dict:
        """JSON-ready metrics (predictions left out: they belong to the images, not the report)."""
        per_class = {
            name: {"precision": p, "recall": r, "f1": f, "support": s}
            for name, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.support)
        }
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "accuracy_ci95": list(self.accuracy_ci95),
            "most_confused": [list(item) for item in self.most_confused()],
            "macro_f1": self.macro_f1,
            "balanced_accuracy": self.balanced_accuracy,
            "per_class": per_class,
            "confusion_matrix": self.confusion.tolist(),
        }


def loss_and_accuracy(
    model: nn.Module, split: Split, *, batch_size: int = 1000, precision: str = "fp32"
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy: the cheap pair computed after every epoch."""
    logits = predict_logits(model, split.images, batch_size=batch_size, precision=precision)
    labels = split.labels.to(logits.device)
    loss = F.cross_entropy(logits, labels).item()
    accuracy = (logits.argmax(1) == labels).float().mean().item()
    return loss, accuracy


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1), torch.zeros_like(numerator))


def evaluate(
    model: nn.Module,
    split: Split,
    classes: list[str] | None = None,
    *,
    batch_size: int = 1000,
    precision: str = "fp32",
    world: World | None = None,
) -> EvalReport:
    """Full report on one labelled split (the test set, once, at the end of training).

    With a data-parallel `world`, every process scores its share of the split and the logits are gathered,
    so each rank holds the report of the whole split at 1/world_size of the work.
    """
    if world is not None and world.distributed:
        logits = sharded_logits(model, split, world, batch_size=batch_size, precision=precision)
    else:
        logits = predict_logits(model, split.images, batch_size=batch_size, precision=precision)
    labels = split.labels.to(logits.device)
    num_classes = logits.shape[1]
    classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
    probabilities = logits.softmax(1)
    confidences, predictions = probabilities.max(1)
    confusion = confusion_matrix(labels, predictions, num_classes).cpu()
    true_positive = confusion.diag().double()
    precision_c = _safe_ratio(true_positive, confusion.sum(0).double())
    recall_c = _safe_ratio(true_positive, confusion.sum(1).double())
    f1_c = _safe_ratio(2 * precision_c * recall_c, precision_c + recall_c)
    return EvalReport(
        loss=F.cross_entropy(logits, labels).item(),
        accuracy=(predictions == labels).double().mean().item(),
        classes=classes,
        confusion=confusion,
        precision=precision_c.tolist(),
        recall=recall_c.tolist(),
        f1=f1_c.tolist(),
        support=confusion.sum(1).tolist(),
        predictions=predictions.cpu(),
        confidences=confidences.cpu(),
    )


def sharded_logits(model: nn.Module, split: Split, world: World, *, batch_size: int = 1000,
                   precision: str = "fp32") -> torch.Tensor:
    """The logits of the whole split on every rank, each rank having scored images rank, rank + W, ...

    BatchNorm buffers come from rank 0 first (each rank's running statistics drift apart in DDP training),
    so the report is that of one model. Shares differ by at most one image; each is padded to the longest
    for the all-gather and the padding dropped when the images are put back in order.
    """
    broadcast_buffers(model)
    size, ranks = len(split), world.world_size
    if size < ranks:  # a share would be empty: too small to be worth splitting
        return predict_logits(model, split.images, batch_size=batch_size, precision=precision)
    share = split.take(slice(world.rank, None, ranks))
    local = predict_logits(model, share.images, batch_size=batch_size, precision=precision)
    rows = -(-size // ranks)
    padded = local.new_zeros(rows, local.shape[1])
    padded[: len(local)] = local
    gathered = all_gather(padded, world)
    return torch.stack(gathered, dim=1).reshape(rows * ranks, -1)[:size]  # image i: rank i % W, row i // W

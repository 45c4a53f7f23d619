"""Metrics on a labelled split: loss, accuracy, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.data.tensors import Split
from cnnkit.engine.inference import predict_logits


@dataclass
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

    def to_dict(self) -> dict:
        """JSON-ready metrics (predictions left out: they belong to the images, not the report)."""
        per_class = {
            name: {"precision": p, "recall": r, "f1": f, "support": s}
            for name, p, r, f, s in zip(self.classes, self.precision, self.recall, self.f1, self.support)
        }
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "macro_f1": sum(self.f1) / max(1, len(self.f1)),
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
) -> EvalReport:
    """Full report on one labelled split (the test set, once, at the end of training)."""
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

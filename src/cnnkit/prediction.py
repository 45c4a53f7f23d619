"""Prediction on image files: each file is converted exactly as the run's model.json says.

The conversion itself (decode, resize, match the training data's background) lives in cnnkit.preprocess,
shared with training, which writes the record it follows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.data.images import IMAGE_EXTENSIONS
from cnnkit.errors import CnnkitError
from cnnkit.preprocess import load_image

__all__ = ["Prediction", "expand_image_paths", "load_image", "predict", "predict_files"]


@dataclass
class Prediction:
    file: str
    label: str
    confidence: float
    top: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"file": self.file, "label": self.label, "confidence": self.confidence,
                "top": [[label, p] for label, p in self.top]}


def expand_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the image files inside directories (recursively, hidden ones skipped)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise CnnkitError(f"{path}: no image files in this directory")
            paths.extend(found)
        elif path.is_file():
            paths.append(path)
        else:
            raise CnnkitError(f"{path}: no such file or directory")
    return paths


def predict(model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Class probabilities (N, K) for uint8 images (N, C, H, W)."""
    from cnnkit.engine.inference import predict_logits

    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.ndim != 4:
        raise CnnkitError(f"predict needs uint8 images shaped (N, C, H, W), got {tensor.dtype} {tuple(tensor.shape)}")
    return predict_logits(model, tensor, batch_size=batch_size).softmax(1)


def predict_files(run, inputs: Sequence[str | Path], top: int = 1) -> list[Prediction]:
    """Predictions for image files and directories with a loaded run (see runs.load_run)."""
    paths = expand_image_paths(inputs)
    images = np.stack([load_image(path, run.meta) for path in paths])
    probabilities = predict(run.model, images)
    k = max(1, min(top, probabilities.shape[1]))
    values, indices = probabilities.topk(k, dim=1)
    classes = run.classes
    results = []
    for path, vals, idxs in zip(paths, values.tolist(), indices.tolist()):
        ranked = [(classes[i], float(v)) for v, i in zip(vals, idxs)]
        results.append(Prediction(str(path), ranked[0][0], ranked[0][1], ranked))
    return results

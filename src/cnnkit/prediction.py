"""Prediction on image files: each file is converted exactly as the run's model.json says.

Any PNG/JPEG (or other Pillow-readable) image of any size or mode is decoded with the same function
that decodes folder datasets (orientation, mode, bilinear resize), then, when the model was trained
on light-on-dark images (MNIST-style) and the photo is dark-on-light (ink on paper), inverted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnkit.errors import CnnkitError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


@dataclass
class Prediction:
    file: str
    label: str
    confidence: float
    top: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"file": self.file, "label": self.label, "confidence": self.confidence,
                "top": [[label, p] for label, p in self.top]}


#: Share of training images that must agree on a background before prediction inverts photos to match.
CONSISTENT_BACKGROUND = 0.95


def border_means(images: np.ndarray) -> np.ndarray:
    """Per-image mean of the outermost pixel ring of (N, C, H, W) images: each one's background brightness."""
    ring = np.concatenate([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], axis=-1)
    return ring.reshape(len(images), -1).mean(axis=1)


def background_of(images: np.ndarray) -> str | None:
    """'dark' or 'light' when (nearly) every image shares it, as in MNIST-style data; else None.

    Recorded in model.json so prediction can invert ink-on-paper photos for a light-on-dark model. Natural
    photos (CIFAR) have no common background, and inverting those by their border would corrupt them.
    """
    dark = float((border_means(images) < 128).mean())
    if dark >= CONSISTENT_BACKGROUND:
        return "dark"
    if dark <= 1 - CONSISTENT_BACKGROUND:
        return "light"
    return None


def expand_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the image files inside directories (recursively, hidden ones skipped)."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
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


def load_image(path: str | Path, meta: dict) -> np.ndarray:
    """One file as uint8 (C, H, W), preprocessed as the model's metadata says."""
    from PIL import Image

    from cnnkit.data.folder import decode_image

    spec = meta["input"]
    try:
        array = decode_image(path, (int(spec["height"]), int(spec["width"])), int(spec["channels"]))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:  # unreadable/corrupt/hostile
        raise CnnkitError(f"{path}: not a readable image ({type(error).__name__}: {error})") from None
    background = meta.get("preprocessing", {}).get("background")
    if background is not None and background_of(array[None]) not in (background, None):
        array = 255 - array
    return array


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

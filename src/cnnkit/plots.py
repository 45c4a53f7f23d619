"""The PNG figures of a run: learning curves, confusion matrix, misclassified test images.

Uses matplotlib's object API on the Agg canvas (no pyplot, no display, no global state) and writes
through the atomic-file helper, so a figure is never half-written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cnnkit.fileio import atomic_path


def _save(figure: Figure, path: str | Path) -> None:
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_history(history: dict[str, Sequence[float]], path: str | Path, title: str = "") -> None:
    """Accuracy and loss per epoch, training and validation, side by side."""
    figure = Figure(figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in zip(figure.subplots(1, 2), ("accuracy", "loss")):
        ax.plot(epochs, history[metric], "o-", label=f"train {metric}")
        ax.plot(epochs, history[f"val_{metric}"], "s-", label=f"validation {metric}")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(metric.capitalize())
        ax.set_xticks(epochs if len(epochs) <= 20 else np.linspace(1, len(epochs), 10, dtype=int))
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        figure.suptitle(title)
    _save(figure, path)


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> None:
    """Counts with rows = true class, columns = predicted class; the diagonal is what went right."""
    matrix = np.asarray(matrix)
    size = max(5.0, 0.45 * len(classes) + 2)
    figure = Figure(figsize=(size, size))
    ax = figure.subplots()
    image = ax.imshow(matrix, cmap="Blues")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ticks = np.arange(len(classes))
    labels = [str(c) for c in classes]
    ax.set_xticks(ticks, labels, rotation=90 if max(map(len, labels)) > 2 else 0)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    if len(classes) <= 20:
        threshold = matrix.max() / 2 if matrix.size else 0
        for (row, col), count in np.ndenumerate(matrix):
            ax.text(col, row, str(count), ha="center", va="center", fontsize=7,
                    color="white" if count > threshold else "black")
    ax.set_title(title or "Confusion matrix (test set)")
    _save(figure, path)


def mosaic(images: np.ndarray, columns: int, top_gap: int, side_gap: int) -> np.ndarray:
    """Tile uint8 (N, C, H, W) images into one picture, each below a `top_gap` strip left for its caption."""
    count, channels, height, width = images.shape
    rows = max(1, -(-count // columns))
    cell_h, cell_w = height + top_gap, width + side_gap
    canvas = np.full((rows * cell_h, columns * cell_w, channels), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, columns)
        top, left = row * cell_h + top_gap, col * cell_w + side_gap // 2
        canvas[top : top + height, left : left + width] = image.transpose(1, 2, 0)
    return canvas


def plot_errors(
    images: np.ndarray,
    true_labels: Sequence[str],
    predicted_labels: Sequence[str],
    confidences: Sequence[float],
    path: str | Path,
    columns: int = 6,
) -> None:
    """A grid of misclassified images (uint8, N x C x H x W) captioned 'true -> predicted (confidence)'.

    Drawn as one mosaic on a single axes: 36 separate subplots took ~1 s, a real share of a fast run.
    """
    images = np.asarray(images)
    if len(images) == 0:
        figure = Figure(figsize=(6, 2))
        figure.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        _save(figure, path)
        return
    _, channels, height, width = images.shape
    top_gap, side_gap = max(4, height // 2), max(2, width // 6)
    canvas = mosaic(images, columns, top_gap, side_gap)
    fig_width = columns * 1.5
    figure = Figure(figsize=(fig_width, fig_width * canvas.shape[0] / canvas.shape[1] + 0.5))
    ax = figure.add_axes((0.0, 0.0, 1.0, 1.0 - 0.5 / figure.get_figheight()))
    ax.axis("off")
    ax.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray" if channels == 1 else None,
              vmin=0, vmax=255, interpolation="nearest")
    for i, (true, pred, conf) in enumerate(zip(true_labels, predicted_labels, confidences)):
        row, col = divmod(i, columns)
        x = col * (width + side_gap) + side_gap // 2 + width / 2 - 0.5
        y = row * (height + top_gap) + top_gap - 1
        ax.text(x, y, f"{true} → {pred} ({conf:.0%})", ha="center", va="bottom", fontsize=8, color="firebrick")
    figure.suptitle("Misclassified test images: true → predicted (confidence)", y=0.995, va="top")
    _save(figure, path)

"""The PNG figures of a run: learning curves, confusion matrix, misclassified test images, per-class scores.

Uses matplotlib's object API on the Agg canvas (no pyplot, no display, no global state) and writes
through the atomic-file helper, so a figure is never half-written. Every plot function returns its
Figure, so tests (and notebooks) can inspect the artists that were drawn.

These figures are looked at, not read: each one is laid out so that the thing worth seeing (the kept
epoch, the off-diagonal errors, the weakest classes) is visible at a glance, and text is sized and
placed from measured extents so that it never overlaps or falls off the edge.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from matplotlib.transforms import Bbox, blended_transform_factory

from cnnkit.engine.logs import EMA_WEIGHTS, logs_key
from cnnkit.fileio import atomic_path

DPI = 110
TITLE_LIMIT = 60  # characters; longer titles are shortened (absolute paths first)
FEW_EPOCHS = 3  # up to this many epochs, per-step curves replace the per-epoch training line
BEST_EPOCH_GID = "best-epoch"  # gid of the vertical line marking the kept epoch (tests find it by this)
CELL_TEXT_LIMIT = 20  # confusion matrices up to this many classes get a count in every non-zero cell
CONFUSION_MAX_INCHES = 12.0  # the confusion matrix's square never grows past this, even for 100 classes
RATE_GAMMA = 0.4  # PowerNorm exponent: a 1.3% error lands ~18% up the colour map instead of ~1%
PER_CLASS_ALL_LIMIT = 30  # up to this many classes, plot_per_class shows every class
CAPTION_FONT = 8.0  # errors grid: preferred caption size in points ...
MIN_CAPTION_FONT = 5.5  # ... and the smallest it shrinks to before class names are ellipsised
CAPTION_LINESPACING = 1.15
ERROR_IMAGE_INCHES = 1.2  # errors grid: the longer side of each image
MAX_ERROR_CELL_INCHES = 2.4  # errors grid: a cell widens for long captions up to this


def _rate_colormap() -> ListedColormap:
    """magma reversed (perceptually uniform, light to dark) with exactly 0 drawn white.

    Any error at all then shows as colour on white, and the near-black diagonal keeps white counts legible.
    """
    from matplotlib import colormaps

    colors = colormaps["magma_r"](np.linspace(0.0, 1.0, 256))
    colors[0] = (1.0, 1.0, 1.0, 1.0)
    return ListedColormap(colors, name="cnnkit_rates")


RATE_CMAP = _rate_colormap()


def _save(figure: Figure, path: str | Path) -> None:
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")


# Matches an absolute POSIX path (not preceded by a word character, so "T-shirt/top" is left alone) and
# captures its last component.
_ABS_PATH = re.compile(r"(?<![\w.~])/(?:[^/\s:]+/)*([^/\s:]+)/?")


def short_title(title: str, limit: int = TITLE_LIMIT) -> str:
    """`title` if short; else with absolute paths cut to their last component, then middle-ellipsised.

    Callers pass "model on dataset", and an image-folder dataset's name is its absolute path: the
    folder's own name is what identifies it, and the end of a title (e.g. the test accuracy) matters.
    """
    if len(title) <= limit:
        return title
    title = _ABS_PATH.sub(r"\1", title)
    if len(title) <= limit:
        return title
    head = (limit - 1) // 2
    return f"{title[:head]}…{title[len(title) - (limit - 1 - head):]}"


# --- learning curves -------------------------------------------------------------------------------------


def plot_history(history: dict[str, Sequence[float]], path: str | Path, title: str = "", *,
                 best_epoch: int | None = None, steps: dict[str, Sequence[float]] | None = None) -> Figure:
    """Accuracy and loss side by side: training, validation and (when recorded) EMA validation.

    `best_epoch` (the epoch whose weights the run kept, 1-based) is marked with a labelled vertical line,
    because it is the epoch the test numbers describe. With at most FEW_EPOCHS epochs a per-epoch training
    line is one to three dots, so when `steps` (columns of steps.csv: epoch as a fraction, loss, accuracy)
    is given, the per-step running means are drawn instead and a one-epoch run is still a learning curve.
    One legend below both panels (they share colours) keeps the curves and the marker's label uncovered.
    """
    figure = Figure(figsize=(10, 4.4), layout="constrained")
    epochs = np.arange(1, len(history["loss"]) + 1)
    per_step = steps if _has_steps(steps) and len(epochs) <= FEW_EPOCHS else None
    axes = figure.subplots(1, 2)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        _plot_training(ax, epochs, history, metric, per_step)
        _plot_validation(ax, epochs, history, metric)
        if best_epoch is not None:
            _mark_best_epoch(ax, best_epoch, len(epochs), metric)
        _style_epoch_axis(ax, epochs, metric, per_step is not None)
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=4, fontsize=8,
                  frameon=False)
    if title:
        figure.suptitle(short_title(title), parse_math=False)
    _save(figure, path)
    return figure


def _has_steps(steps: dict[str, Sequence[float]] | None) -> bool:
    return bool(steps) and all(len(steps.get(key, ())) > 1 for key in ("epoch", "loss", "accuracy"))


def _finite(values: Sequence[float]) -> bool:
    return bool(np.isfinite(np.asarray(values, dtype=float)).any())


def _plot_training(ax, epochs: np.ndarray, history: dict[str, Sequence[float]], metric: str,
                   steps: dict[str, Sequence[float]] | None) -> None:
    if steps is not None:
        ax.plot(np.asarray(steps["epoch"], dtype=float), np.asarray(steps[metric], dtype=float), "-", lw=1.3,
                color="C0", label="train (running mean within each epoch, per step)", gid=f"train-steps-{metric}")
    else:
        ax.plot(epochs, history[metric], "o-", color="C0", label="train", gid=f"train-{metric}")


def _plot_validation(ax, epochs: np.ndarray, history: dict[str, Sequence[float]], metric: str) -> None:
    ax.plot(epochs, history[f"val_{metric}"], "s-", color="C1", label="validation (end of epoch)",
            gid=f"val-{metric}")
    ema = history.get(logs_key(EMA_WEIGHTS, f"val_{metric}"))
    if ema is not None and _finite(ema):
        ax.plot(epochs, ema, "D--", color="C2", label="EMA weights, validation", gid=f"ema-val-{metric}")


def _mark_best_epoch(ax, best_epoch: int, epochs: int, metric: str) -> None:
    """A dotted vertical line at the kept epoch, labelled beside it where the curves rarely are.

    Accuracy rises, so its label sits at the bottom of the panel; loss falls, so its label sits at the top.
    """
    ax.axvline(best_epoch, color="0.3", ls=":", lw=1.5, label=f"best epoch {best_epoch}", gid=BEST_EPOCH_GID)
    right_half = best_epoch > (epochs + 1) / 2 or epochs == 1
    bottom = metric == "accuracy"
    ax.text(best_epoch, 0.02 if bottom else 0.98, f" best epoch {best_epoch} ",
            transform=blended_transform_factory(ax.transData, ax.transAxes), ha="right" if right_half else "left",
            va="bottom" if bottom else "top", fontsize=8, color="0.3", gid=f"{BEST_EPOCH_GID}-label",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.0})


def _style_epoch_axis(ax, epochs: np.ndarray, metric: str, per_step: bool) -> None:
    ax.set_xlabel("Epoch")
    ax.set_ylabel(metric.capitalize())
    ax.set_title(f"{metric.capitalize()} (higher is better)" if metric == "accuracy" else
                 "Loss (lower is better)", fontsize=10)
    if per_step:  # the x axis runs from the start of training (0) to the end of the last epoch
        ax.set_xlim(0, len(epochs) * 1.02)
        ax.set_xticks(np.arange(0, len(epochs) + 0.01, 0.25 if len(epochs) == 1 else 0.5))
    elif len(epochs) <= 20:
        ax.set_xticks(epochs)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


# --- confusion matrix ------------------------------------------------------------------------------------


def row_rates(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total: the share of a true class's images given each prediction (0 if empty)."""
    counts = np.asarray(matrix, dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: str | Path, title: str = "") -> Figure:
    """Rows = true class, columns = predicted; colour = share of the true class's images (rows sum to 100%).

    Counts would let the diagonal (hundreds) set the colour scale and leave the errors that matter (a
    dozen) white, so colour shows the row rate on a power scale (RATE_GAMMA) with zero exactly white: a
    1-2% confusion is a clear orange, and the count is written in every non-zero cell up to
    CELL_TEXT_LIMIT classes. The figure is capped at CONFUSION_MAX_INCHES and the class labels are sized
    to the cell pitch, so 100 classes stay legible without overlapping.
    """
    counts = np.asarray(matrix)
    rates = row_rates(counts)
    side = min(CONFUSION_MAX_INCHES, max(5.0, 0.5 * len(classes) + 2.5))
    figure = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(rates, cmap=RATE_CMAP, norm=PowerNorm(RATE_GAMMA, vmin=0.0, vmax=1.0),
                      interpolation="nearest", gid="confusion-rates")
    colorbar = figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02, ticks=[0, 0.01, 0.05, 0.2, 0.5, 1.0])
    colorbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.0%}"))
    colorbar.set_label("share of the true class's test images")
    _class_ticks(ax, [str(name) for name in classes], side)
    if len(classes) <= CELL_TEXT_LIMIT:
        _write_counts(ax, counts, image, side)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title(short_title(title) if title else "Confusion matrix (test set)", parse_math=False)
    if len(classes) > CELL_TEXT_LIMIT:  # up to 20 classes the cells are >= 0.4 in: 9 pt labels always fit
        _fit_tick_labels(figure, ax)
    _save(figure, path)
    return figure


def _class_ticks(ax, labels: list[str], side: float) -> None:
    """Every class labelled on both axes, the font sized to the cell pitch (12-inch/100 classes: ~5 pt)."""
    pitch_points = (side - 2.5) * 72 / max(1, len(labels))
    fontsize = float(np.clip(0.8 * pitch_points, 3.0, 9.0))
    ticks = np.arange(len(labels))
    rotation = 90 if labels and max(map(len, labels)) > 2 else 0
    ax.set_xticks(ticks, labels, rotation=rotation, fontsize=fontsize, parse_math=False)
    ax.set_yticks(ticks, labels, fontsize=fontsize, parse_math=False)
    ax.tick_params(length=2 if len(labels) > CELL_TEXT_LIMIT else 3.5, pad=1.5)


def _fit_tick_labels(figure: Figure, ax) -> None:
    """Resize the class labels to fill ~85% of the cell pitch once laid out (measured, not guessed).

    The first guess cannot know how much room the longest (rotated) names and the colour bar take, so
    the layout is drawn, neighbouring labels' extents are compared with their spacing, and the font is
    scaled until they nearly touch without overlapping (a few passes: larger labels shrink the axes).
    """
    FigureCanvasAgg(figure)
    for _ in range(5):
        figure.draw_without_rendering()
        renderer = figure.canvas.get_renderer()
        worst = max(_crowding([t.get_window_extent(renderer) for t in labels if t.get_text()], axis)
                    for labels, axis in ((ax.get_xticklabels(), 0), (ax.get_yticklabels(), 1)))
        labels = (*ax.get_xticklabels(), *ax.get_yticklabels())
        current = labels[0].get_fontsize() if labels else 9.0
        if worst == 0.0 or 0.75 <= worst <= 0.9 or (worst < 0.75 and current >= 9.0):
            return
        for label in labels:
            label.set_fontsize(float(np.clip(current * 0.85 / worst, 2.5, 9.0)))


def _crowding(boxes: list[Bbox], axis: int) -> float:
    """Largest (label extent across the axis) / (spacing to its neighbour); above 1 means overlap."""
    if len(boxes) < 2:
        return 0.0
    starts = np.array([b.x0 if axis == 0 else b.y0 for b in boxes])
    sizes = np.array([b.width if axis == 0 else b.height for b in boxes])
    order = np.argsort(starts)
    gaps = np.diff(starts[order])
    return float(np.max(sizes[order][:-1] / np.maximum(gaps, 1e-9)))


def _write_counts(ax, counts: np.ndarray, image, side: float) -> None:
    """The count in every non-zero cell (zeros left blank so the errors stand out), legible on its colour."""
    pitch_points = (side - 2.5) * 72 / max(1, len(counts))
    fontsize = float(np.clip(0.3 * pitch_points, 5.0, 9.0))
    rates = image.get_array()
    for (row, col), count in np.ndenumerate(counts):
        if count == 0:
            continue
        red, green, blue, _ = image.cmap(image.norm(rates[row, col]))
        dark = 0.2126 * red + 0.7152 * green + 0.0722 * blue < 0.45
        ax.text(col, row, str(int(count)), ha="center", va="center", fontsize=fontsize,
                color="white" if dark else "black", gid="confusion-count")


# --- misclassified images --------------------------------------------------------------------------------


def format_confidence(confidence: float) -> str:
    """A probability as a percentage floored to one decimal: 0.99996 reads "99.9%", never "100%".

    Rounding showed most confident mistakes as "(100%)", which a softmax never is and which hides how
    sure the model was; flooring never claims more certainty than there was.
    """
    tenths = math.floor(float(confidence) * 1000 + 1e-9)
    return f"{min(max(tenths, 0), 999) / 10:.1f}%"


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
) -> Figure:
    """A grid of misclassified images (uint8, N x C x H x W), each captioned "true →" / "predicted (conf)".

    Drawn as one mosaic on a single axes: 36 separate subplots took ~1 s, a real share of a fast run.
    Captions take two lines and the cells are sized from the captions' measured width (widened up to
    MAX_ERROR_CELL_INCHES, then the font shrinks, then names are ellipsised), so long class names such as
    "Ankle boot" or "T-shirt/top" never overlap a neighbour or run off the figure.
    """
    images = np.asarray(images)
    if len(images) == 0:
        figure = Figure(figsize=(6, 2))
        figure.text(0.5, 0.5, "no misclassified test images", ha="center", va="center")
        _save(figure, path)
        return figure
    measure = _text_meter()
    pairs = [(str(t), f"{p} ({format_confidence(c)})") for t, p, c in zip(true_labels, predicted_labels, confidences)]
    fontsize, captions = _fit_captions(pairs, MAX_ERROR_CELL_INCHES - 0.15, measure)
    text_w = max(measure(c, fontsize)[0] for c in captions)
    text_h = max(measure(c, fontsize)[1] for c in captions)
    _, channels, height, width = images.shape
    per_inch = max(height, width) / ERROR_IMAGE_INCHES  # image pixels per inch of figure
    cell_w = max(text_w + 0.15, width / per_inch + 0.2)
    side_gap = math.ceil(cell_w * per_inch) - width
    top_gap = math.ceil((text_h + 0.1) * per_inch)
    canvas = mosaic(images, columns, top_gap, side_gap)
    grid_w, grid_h = canvas.shape[1] / per_inch, canvas.shape[0] / per_inch
    header = 0.5  # inches above the grid for the figure title
    figure = Figure(figsize=(grid_w, grid_h + header))
    ax = figure.add_axes((0.0, 0.0, 1.0, grid_h / (grid_h + header)))
    ax.axis("off")
    ax.imshow(canvas[..., 0] if channels == 1 else canvas, cmap="gray" if channels == 1 else None,
              vmin=0, vmax=255, interpolation="nearest", aspect="auto")
    for i, caption in enumerate(captions):
        row, col = divmod(i, columns)
        x = col * (width + side_gap) + side_gap // 2 + width / 2 - 0.5
        y = row * (height + top_gap) + top_gap - 0.5 - 0.04 * per_inch  # just above the image's top edge
        ax.text(x, y, caption, ha="center", va="bottom", fontsize=fontsize, color="firebrick",
                linespacing=CAPTION_LINESPACING, parse_math=False, gid="error-caption")
    _errors_title(figure, grid_w, header, measure)
    _save(figure, path)
    return figure



def _text_meter():
    """measure(text, fontsize) -> (width, height) in inches as Agg draws it, multi-line text included."""
    figure = Figure(figsize=(4, 4))
    FigureCanvasAgg(figure)
    renderer = figure.canvas.get_renderer()
    artist = figure.text(0, 0, "", linespacing=CAPTION_LINESPACING, parse_math=False)

    def measure(text: str, fontsize: float) -> tuple[float, float]:
        artist.set_text(text)
        artist.set_fontsize(fontsize)
        box = artist.get_window_extent(renderer)
        return box.width / figure.dpi, box.height / figure.dpi

    return measure


def _fit_captions(pairs: list[tuple[str, str]], max_width: float, measure) -> tuple[float, list[str]]:
    """The caption font size and two-line captions, every one at most `max_width` inches wide.

    Shrinks the font (not below MIN_CAPTION_FONT) to fit the widest caption, then ellipsises any name
    that still does not fit; the confidence is never cut.
    """
    captions = [f"{true} →\n{predicted}" for true, predicted in pairs]
    widest = max(measure(c, CAPTION_FONT)[0] for c in captions)
    fontsize = CAPTION_FONT if widest <= max_width else max(MIN_CAPTION_FONT, CAPTION_FONT * max_width / widest * 0.97)
    fitted = []
    for true, predicted in pairs:
        first = _ellipsise(true, " →", fontsize, max_width, measure)
        name, _, confidence = predicted.rpartition(" (")
        second = _ellipsise(name, f" ({confidence}", fontsize, max_width, measure)
        fitted.append(f"{first}\n{second}")
    return fontsize, fitted


def _ellipsise(name: str, suffix: str, fontsize: float, max_width: float, measure) -> str:
    """`name + suffix`, with the end of `name` replaced by "…" as far as needed to fit `max_width`."""
    if measure(name + suffix, fontsize)[0] <= max_width:
        return name + suffix
    while name and measure(f"{name}…{suffix}", fontsize)[0] > max_width:
        name = name[:-1]
    return f"{name}…{suffix}"


def _errors_title(figure: Figure, width: float, header: float, measure) -> None:
    """The grid's title, on two lines (then smaller) when one line would not fit the grid's width."""
    text = "Misclassified test images: true → predicted (confidence)"
    if measure(text, 11)[0] > width - 0.1:
        text = "Misclassified test images\ntrue → predicted (confidence)"
    fontsize = 11.0
    while fontsize > 6 and (measure(text, fontsize)[0] > width - 0.1 or measure(text, fontsize)[1] > header - 0.1):
        fontsize -= 0.5
    figure.suptitle(text, y=1 - 0.05 / figure.get_figheight(), va="top", fontsize=fontsize, parse_math=False)


# --- per-class precision and recall ----------------------------------------------------------------------


def plot_per_class(classes: Sequence[str], precision: Sequence[float], recall: Sequence[float],
                   path: str | Path, title: str = "") -> Figure:
    """Precision and recall per class as horizontal bars: class names read horizontally, whatever their length.

    Up to PER_CLASS_ALL_LIMIT classes every class is shown, in class order, so a reader finds a class where
    they expect it. With more (CIFAR-100) a bar pair per class would need ~20 inches to stay legible, and
    what a reader looks for is the weak classes, so the figure shows the PER_CLASS_ALL_LIMIT classes with
    the lowest F1, worst at the top, and says so in its title (every class's numbers are in report.html).
    The score axis starts just below the lowest bar: on a 0-1 axis, 0.93 and 0.99 look the same.
    """
    names = [str(name) for name in classes]
    prec = np.nan_to_num(np.asarray(precision, dtype=float))
    rec = np.nan_to_num(np.asarray(recall, dtype=float))
    rows, heading = _per_class_rows(prec, rec)
    height = float(np.clip(0.32 * len(rows) + 1.4, 3.0, 11.5))
    label_chars = max((len(names[i]) for i in rows), default=1)
    figure = Figure(figsize=(7.5 + 0.06 * min(label_chars, 30), height), layout="constrained")
    ax = figure.subplots()
    y = np.arange(len(rows))
    ax.barh(y - 0.2, prec[rows], height=0.38, color="C0", label="precision", gid="precision-bars")
    ax.barh(y + 0.2, rec[rows], height=0.38, color="C1", label="recall", gid="recall-bars")
    ax.set_yticks(y, [names[i] for i in rows], fontsize=8 if len(rows) <= 20 else 7, parse_math=False)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # first row at the top
    low = float(min(prec[rows].min(), rec[rows].min())) if len(rows) else 0.0
    start = max(0.0, math.floor((low - 0.02) * 10) / 10)
    ax.set_xlim(start, 1.0)
    ax.set_xlabel("score" + (f" (axis starts at {start:.1f})" if start > 0 else ""))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, frameon=False, fontsize=8)
    heading = heading if heading else "Precision and recall per class (test set)"
    figure.suptitle(f"{short_title(title)}\n{heading}" if title else heading, fontsize=10, parse_math=False)
    _save(figure, path)
    return figure


def _per_class_rows(precision: np.ndarray, recall: np.ndarray) -> tuple[list[int], str]:
    """Which classes to draw, in order, and a heading saying so when it is not all of them."""
    count = len(precision)
    if count <= PER_CLASS_ALL_LIMIT:
        return list(range(count)), ""
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(count), where=precision + recall > 0)
    worst = np.argsort(f1, kind="stable")[:PER_CLASS_ALL_LIMIT]
    return worst.tolist(), f"The {PER_CLASS_ALL_LIMIT} classes with the lowest F1 of {count} (worst at the top)"


# --- comparing runs --------------------------------------------------------------------------------------

COMPARE_GID = "compare"  # gid prefix of each run's curve: "compare-val_accuracy-<label>" (tests find them by this)
LINESTYLES = ("-", "--", ":", "-.")  # past ten runs the colours repeat, so the line style changes
COMPARE_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_comparison(histories: dict[str, dict[str, Sequence[float]]], path: str | Path, title: str = "") -> Figure:
    """Several runs' validation accuracy (and validation loss, when recorded) per epoch, one line per run.

    `histories` maps the legend label (the run's name) to its history.csv columns, "epoch" among them.
    Runs of different lengths share the epoch axis, so a longer run's extra epochs show as a longer line;
    one legend below both panels (they share colours) names the runs without covering the curves.
    """
    metrics = [m for m in ("val_accuracy", "val_loss") if any(_finite(h.get(m, [])) for h in histories.values())]
    metrics = metrics or ["val_accuracy"]
    figure = Figure(figsize=(5.2 * len(metrics) + 0.6, 4.4), layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(metrics)))
    longest = max((len(h.get("epoch", [])) for h in histories.values()), default=1)
    epochs = np.arange(1, max(1, longest) + 1)
    for ax, metric in zip(axes, metrics):
        for i, (label, history) in enumerate(histories.items()):
            if metric not in history:
                continue
            # Runs with the same seed share their first epochs exactly: each later run is drawn thinner and
            # with smaller markers on top, so the earlier one still shows around it.
            ax.plot(np.asarray(history["epoch"], dtype=float), np.asarray(history[metric], dtype=float),
                    marker=COMPARE_MARKERS[i % len(COMPARE_MARKERS)] if longest <= 20 else None,
                    markersize=max(3.0, 8.0 - 1.5 * i), lw=max(1.0, 2.2 - 0.3 * i), color=f"C{i % 10}",
                    ls=LINESTYLES[(i // 10) % len(LINESTYLES)], label=_legend_label(label),
                    gid=f"{COMPARE_GID}-{metric}-{label}")
        kind = metric.removeprefix("val_")
        _style_epoch_axis(ax, epochs, kind, False)
        ax.set_title(f"Validation {kind} ({'higher' if kind == 'accuracy' else 'lower'} is better)", fontsize=10)
        ax.set_ylabel(f"Validation {kind}")
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center",
                  ncols=min(4, max(1, len(histories))), fontsize=8, frameon=False)
    if title:
        figure.suptitle(short_title(title), parse_math=False)
    _save(figure, path)
    return figure


def _legend_label(label: str) -> str:
    """A run name as matplotlib shows it: '$' is not maths, and a leading '_' does not hide the line."""
    label = short_title(label, 40).replace("$", r"\$")
    return f" {label}" if label.startswith("_") else label

"""The run's figures, checked by what they draw: artists found by gid, colours, measured text extents."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox
from PIL import Image

from cnnkit.data.registry import get_spec
from cnnkit.plots import (
    BEST_EPOCH_GID,
    format_confidence,
    plot_confusion_matrix,
    plot_errors,
    plot_history,
    plot_per_class,
    row_rates,
    short_title,
)
from slices import SHARED_DATA, mnist_dataset

FASHION = list(get_spec("fashion-mnist").classes)
CIFAR100 = list(get_spec("cifar100").classes)
DIGITS = [str(i) for i in range(10)]


def _png_size(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _by_gid(figure: Figure, gid: str) -> list:
    return list(figure.findobj(lambda artist: artist.get_gid() == gid))


def _extents(figure: Figure, artists) -> list[Bbox]:
    FigureCanvasAgg(figure)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    return [artist.get_window_extent(renderer) for artist in artists]


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area (px²) two boxes share; 0 when they only touch or are apart."""
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(0.0, width) * max(0.0, height)


def _inside(box: Bbox, outer: Bbox, tolerance: float = 0.5) -> bool:
    return (box.x0 >= outer.x0 - tolerance and box.y0 >= outer.y0 - tolerance
            and box.x1 <= outer.x1 + tolerance and box.y1 <= outer.y1 + tolerance)


# --- learning curves -------------------------------------------------------------------------------------


def _steps(epochs: int, per_epoch: int = 50) -> dict[str, list[float]]:
    """A steps.csv-shaped record: running means within each epoch, ~50 points per epoch."""
    fraction = np.arange(1, epochs * per_epoch + 1) / per_epoch
    return {"step": list(range(1, len(fraction) + 1)), "epoch": fraction.tolist(),
            "loss": (1.0 / (1 + 4 * fraction)).tolist(), "accuracy": (0.6 + 0.3 * fraction / epochs).tolist()}


def test_one_epoch_history_with_steps_is_a_curve_with_the_kept_epoch_marked(tmp_path):
    history = {"loss": [0.42], "accuracy": [0.88], "val_loss": [0.21], "val_accuracy": [0.94],
               "lr": [0.001], "seconds": [3.1]}
    figure = plot_history(history, tmp_path / "history.png", "seed on mnist", best_epoch=1, steps=_steps(1))

    width, height = _png_size(tmp_path / "history.png")
    assert 700 < width < 2000 and 300 < height < 1000
    for metric in ("accuracy", "loss"):
        (curve,) = _by_gid(figure, f"train-steps-{metric}")
        x = np.asarray(curve.get_xdata())
        assert len(x) == 50 and x[0] == pytest.approx(0.02) and x[-1] == pytest.approx(1.0)
        assert not _by_gid(figure, f"train-{metric}")  # the two-dot per-epoch line is gone
    markers = _by_gid(figure, BEST_EPOCH_GID)
    assert len(markers) == 2  # one per panel
    for marker in markers:
        assert list(marker.get_xdata()) == [1, 1] and marker.get_label() == "best epoch 1"
    assert all(t.get_text().strip() == "best epoch 1" for t in _by_gid(figure, f"{BEST_EPOCH_GID}-label"))


def test_long_history_draws_per_epoch_lines_ema_curves_and_marks_the_best_epoch(tmp_path):
    epochs = 12
    rising = np.linspace(0.8, 0.95, epochs)
    history = {"loss": list(1 - rising), "accuracy": list(rising), "val_loss": list(1.05 - rising),
               "val_accuracy": list(rising - 0.02), "ema_val_loss": list(1.02 - rising),
               "ema_val_accuracy": list(rising - 0.01)}
    figure = plot_history(history, tmp_path / "history.png", best_epoch=9, steps=_steps(epochs))

    (train,) = _by_gid(figure, "train-accuracy")
    assert list(train.get_xdata()) == list(range(1, epochs + 1))  # many epochs: per-epoch, steps ignored
    assert not _by_gid(figure, "train-steps-accuracy")
    (ema,) = _by_gid(figure, "ema-val-accuracy")
    np.testing.assert_allclose(ema.get_ydata(), history["ema_val_accuracy"])
    assert [list(m.get_xdata()) for m in _by_gid(figure, BEST_EPOCH_GID)] == [[9, 9], [9, 9]]


def test_history_without_a_kept_epoch_or_ema_draws_neither(tmp_path):
    history = {"loss": [0.5, 0.3], "accuracy": [0.8, 0.9], "val_loss": [0.4, 0.35], "val_accuracy": [0.85, 0.9],
               "ema_val_accuracy": [float("nan")] * 2, "ema_val_loss": [float("nan")] * 2}
    figure = plot_history(history, tmp_path / "history.png")
    assert not _by_gid(figure, BEST_EPOCH_GID)
    assert not _by_gid(figure, "ema-val-accuracy")
    assert len(_by_gid(figure, "val-accuracy")) == 1


# --- confusion matrix ------------------------------------------------------------------------------------


def _mnist_like_confusion() -> np.ndarray:
    """MNIST test-set row totals with the errors a real run makes: 13 of 1,032 twos read as 7 (1.26%)."""
    totals = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    matrix = np.diag(totals)
    for true, predicted, count in [(2, 7, 13), (4, 9, 6), (7, 2, 4), (9, 4, 3), (5, 3, 2), (8, 3, 1)]:
        matrix[true, predicted] += count
        matrix[true, true] -= count
    return matrix


def test_a_one_percent_confusion_is_clearly_coloured_and_every_error_counted(tmp_path):
    matrix = _mnist_like_confusion()
    figure = plot_confusion_matrix(matrix, DIGITS, tmp_path / "cm.png", "seed on mnist: test accuracy 99.04%")

    (image,) = _by_gid(figure, "confusion-rates")
    rates = image.get_array()
    np.testing.assert_allclose(rates, row_rates(matrix))
    assert rates[2, 7] == pytest.approx(13 / 1032)
    error, zero, one_error = (np.array(image.cmap(image.norm(rates[i, j]))[:3]) for i, j in [(2, 7), (0, 1), (8, 3)])
    assert np.linalg.norm(error - zero) > 0.35  # a 1.3% error is a clear colour, not near-white
    assert np.linalg.norm(one_error - zero) > 0.1  # even a single image (0.1%) shows
    counts = [t.get_text() for t in _by_gid(figure, "confusion-count")]
    assert len(counts) == np.count_nonzero(matrix)  # a count in every non-zero cell, zeros left blank
    assert {"13", "6", "1", str(1032 - 13)} <= set(counts)
    assert figure.axes[0].get_title() == "seed on mnist: test accuracy 99.04%"
    width, height = _png_size(tmp_path / "cm.png")
    assert 500 < width < 1500 and 500 < height < 1500


def test_a_100_class_matrix_stays_bounded_with_labels_that_do_not_overlap(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.poisson(0.3, (100, 100)) * (rng.random((100, 100)) < 0.2)
    np.fill_diagonal(matrix, rng.integers(40, 95, 100))
    figure = plot_confusion_matrix(matrix, CIFAR100, tmp_path / "cm100.png", "resnet on cifar100")

    assert max(figure.get_size_inches()) <= 13.5
    width, height = _png_size(tmp_path / "cm100.png")
    assert width <= 1600 and height <= 1600
    ax = figure.axes[0]
    assert not _by_gid(figure, "confusion-count")  # no numbers at 100 classes
    assert [t.get_text() for t in ax.get_yticklabels()] == CIFAR100
    for labels, lo, hi in ((ax.get_yticklabels(), "y0", "y1"), (ax.get_xticklabels(), "x0", "x1")):
        boxes = sorted(_extents(figure, labels), key=lambda b: getattr(b, lo))
        assert labels[0].get_fontsize() >= 4.0  # small but legible
        for below, above in itertools.pairwise(boxes):
            assert getattr(below, hi) <= getattr(above, lo) + 0.01, (below, above)
        assert all(_inside(box, figure.bbox, tolerance=1.0) for box in boxes)


def test_an_image_folder_title_keeps_only_the_folder_name(tmp_path):
    title = "seed on imagefolder:/home/someone/datasets/2024/holiday-photos/pets_sorted: test accuracy 87.50%"
    figure = plot_confusion_matrix(np.eye(3, dtype=int) * 5, ["cat", "dog", "<b>&"], tmp_path / "cm.png", title)
    assert figure.axes[0].get_title() == "seed on imagefolder:pets_sorted: test accuracy 87.50%"


def test_short_title_cuts_paths_then_the_middle_and_leaves_short_titles_alone():
    assert short_title("seed on fashion-mnist") == "seed on fashion-mnist"
    assert short_title("T-shirt/top " * 8).count("T-shirt/top") >= 4  # not taken for a path
    long = "resnet18 with a very long model description on some dataset: test accuracy 91.25%"
    shortened = short_title(long)
    assert len(shortened) == 60 and "…" in shortened and shortened.endswith("test accuracy 91.25%")


# --- misclassified images --------------------------------------------------------------------------------


@pytest.mark.parametrize(("confidence", "text"), [
    (0.99996, "99.9%"), (1.0, "99.9%"), (0.9999999, "99.9%"), (0.999, "99.9%"), (0.5, "50.0%"),
    (0.12345, "12.3%"), (0.0999, "9.9%"), (0.0, "0.0%"),
])
def test_confidences_are_floored_to_a_tenth_of_a_percent(confidence, text):
    assert format_confidence(confidence) == text


@pytest.fixture(scope="module")
def fashion_test_images(shared_data):
    from cnnkit.data.tensors import load_dataset

    data = load_dataset("fashion-mnist", str(SHARED_DATA), limit_train=100, limit_eval=200, progress=False)
    return data.test.images.numpy(), data.test.labels.numpy()


def _assert_captions_fit(figure: Figure, count: int) -> list[str]:
    captions = _by_gid(figure, "error-caption")
    assert len(captions) == count
    boxes = _extents(figure, captions)
    for a, b in itertools.combinations(boxes, 2):
        assert _overlap(a, b) == 0.0, (a, b)
    assert all(_inside(box, figure.bbox) for box in boxes)
    title = _extents(figure, [figure._suptitle])[0]
    assert _inside(title, figure.bbox) and all(_overlap(title, box) == 0.0 for box in boxes)
    return [c.get_text() for c in captions]


def test_error_captions_with_long_fashion_names_never_overlap_or_leave_the_figure(tmp_path, fashion_test_images):
    images, labels = fashion_test_images
    longest = ["T-shirt/top", "Ankle boot", "Pullover", "Sneaker"]
    chosen = [i for i in range(len(labels)) if FASHION[labels[i]] in longest][:36]
    true = [FASHION[labels[i]] for i in chosen]
    predicted = [longest[(longest.index(name) + 1) % 4] for name in true]  # long name -> long name
    confidences = [0.99996, 1.0, 0.5] + [0.9 + 0.09 * i / 36 for i in range(33)]
    figure = plot_errors(images[chosen], true, predicted, confidences, tmp_path / "errors.png")

    texts = _assert_captions_fit(figure, 36)
    assert texts[0] == f"{true[0]} →\n{predicted[0]} (99.9%)"
    assert texts[1].endswith("(99.9%)") and texts[2].endswith("(50.0%)")
    assert not any("100" in text for text in texts)
    assert all("…" not in text for text in texts)  # Fashion-MNIST names fit whole
    width, height = _png_size(tmp_path / "errors.png")
    assert 600 < width < 2500 and 600 < height < 2500


def test_error_captions_with_absurd_names_are_shortened_but_keep_the_confidence(tmp_path, shared_data):
    data = mnist_dataset(1000, 300)
    images = data.test.images[:8].numpy()
    name = "a class name far too long to fit in any cell of the grid, even in a small font and a wide cell"
    figure = plot_errors(images, [name] * 8, ["7"] * 8, [0.987654] * 8, tmp_path / "errors.png", columns=4)
    texts = _assert_captions_fit(figure, 8)
    assert all(text.startswith("a class name") and "…" in text and text.endswith("7 (98.7%)") for text in texts)


def test_no_errors_is_said_in_words(tmp_path):
    figure = plot_errors(np.zeros((0, 1, 28, 28), np.uint8), [], [], [], tmp_path / "errors.png")
    assert [t.get_text() for t in figure.texts] == ["no misclassified test images"]
    assert (tmp_path / "errors.png").stat().st_size > 0


# --- per-class precision and recall ----------------------------------------------------------------------


def test_per_class_bars_for_ten_named_classes(tmp_path):
    precision = np.linspace(0.80, 0.99, 10)
    recall = np.linspace(0.99, 0.75, 10)
    figure = plot_per_class(FASHION, precision, recall, tmp_path / "per_class.png", "seed on fashion-mnist")
    bars = _by_gid(figure, "precision-bars")
    assert len(bars) == 10
    np.testing.assert_allclose([bar.get_width() for bar in bars], precision)
    np.testing.assert_allclose([bar.get_width() for bar in _by_gid(figure, "recall-bars")], recall)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == FASHION  # class order, first at the top
    assert ax.get_xlim()[0] == pytest.approx(0.7)  # zoomed to the data, so the differences show
    width, height = _png_size(tmp_path / "per_class.png")
    assert 500 < width < 1500 and 250 < height < 1300


def test_per_class_for_100_classes_shows_the_30_worst_first(tmp_path):
    rng = np.random.default_rng(1)
    precision, recall = rng.uniform(0.5, 1.0, 100), rng.uniform(0.5, 1.0, 100)
    figure = plot_per_class(CIFAR100, precision, recall, tmp_path / "per_class.png")
    f1 = 2 * precision * recall / (precision + recall)
    names = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert names == [CIFAR100[i] for i in np.argsort(f1)[:30]]
    assert figure.get_size_inches()[1] <= 11.5
    boxes = sorted(_extents(figure, figure.axes[0].get_yticklabels()), key=lambda b: b.y0)
    assert all(a.y1 <= b.y0 for a, b in itertools.pairwise(boxes))
    assert "30 classes with the lowest F1 of 100" in figure._suptitle.get_text()

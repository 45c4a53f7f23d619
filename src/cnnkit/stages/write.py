"""Stage 6, write the run: metrics.json, model and weights, plots and the report, in the staging directory,
renamed into place only whole; rescued elsewhere when the runs folder fails."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cnnkit.config import TrainConfig
from cnnkit.data.augment import resolve_flip
from cnnkit.data.balance import class_counts, imbalance_of
from cnnkit.data.tensors import Dataset
from cnnkit.engine.cpu import peak_rss_mb
from cnnkit.errors import RunNotWritten, describe_os_error
from cnnkit.text import printable
from cnnkit.engine.evaluate import EvalReport
from cnnkit.engine.callbacks import History
from cnnkit.engine.distributed import World
from cnnkit.engine.features import FeatureSummary
from cnnkit.stages.training import ProbeSummary
from cnnkit.models.user import SOURCE_COPY
from cnnkit.preprocess import preprocessing_meta
from cnnkit.report import write_report
from cnnkit.runs import save_model
from cnnkit.runs import write_json
from cnnkit.fileio import atomic_path, current_umask, write_text
from cnnkit import __version__
from cnnkit.heatmaps import explain, overlay
from cnnkit.engine.checkpoint import remove_checkpoint


ERROR_GRID_SIZE = 36


TARGET_ACCURACY = 0.99


def model_meta(config: TrainConfig, data: Dataset, model: torch.nn.Module) -> dict[str, Any]:
    """What model.json records: enough to rebuild the model and feed it a new image."""
    channels, height, width = data.input_shape
    return {
        "architecture": config.model,
        "model_kwargs": config.model_kwargs,
        "classes": data.classes,
        "dataset": data.name,
        "input": {"channels": channels, "height": height, "width": width, "dtype": "uint8", "layout": "NCHW"},
        "preprocessing": preprocessing_meta(channels, model.rescale.mean, model.rescale.std,
                                            data.train.images[:2000].numpy()),
        "tta": config.tta,  # load_run wraps the model in it, so evaluate/predict/export/serve use it
        "flip": resolve_flip(config.flip, data.mirror_ok),  # whether training mirrored images
        "mirror_ok": data.mirror_ok,
        "code": model.code.record() if getattr(model, "code", None) else None,  # FILE.py:FUNCTION models
        "weights_from": getattr(model, "weights_from", None),  # --init / --weights, or None: random
        "cnnkit_version": _version(),
        "torch_version": torch.__version__,
    }


def _version() -> str:
    return __version__


def write_or_rescue(staging: Path, name: str, write: Callable[[Path], None]) -> None:
    """Write the finished run into `staging`; if its disk refuses (full, read-only, permissions), write it
    whole where it can still go and raise RunNotWritten naming that place: a finished training is never
    lost to a full disk. Only when nowhere takes it does the error say so (a checkpoint, if any, is kept).
    """
    try:
        write(staging)
        return
    except OSError as error:
        problem = describe_os_error(error)
        if problem is None:
            raise
    discard_run_files(staging)  # what was written before the failure only takes space on a full disk
    tried = []
    for folder in rescue_folders():
        rescued = rescue_into(folder, name, write)
        if rescued is not None:
            remove_checkpoint(staging)  # the run is whole elsewhere: nothing is left to resume
            raise RunNotWritten(f"the trained run could not be written in {staging.parent} ({problem}); it is saved "
                                f"whole in {rescued} instead: move it where you want it (mv {rescued} "
                                f"{staging.parent}/)")
        tried.append(str(folder))
    raise RunNotWritten(f"the trained run could not be written in {staging.parent} ({problem}), nor in "
                        f"{', '.join(tried)}")


def rescue_folders() -> list[Path]:
    """Where a run goes when its runs folder refuses it: the temporary folder ($TMPDIR), the current one, home."""
    folders: list[Path] = []
    for folder in (Path(tempfile.gettempdir()), Path.cwd(), Path.home()):
        if folder.is_dir() and all(not folder.samefile(other) for other in folders):
            folders.append(folder)
    return folders


def rescue_into(folder: Path, name: str, write: Callable[[Path], None]) -> Path | None:
    """`folder/cnnkit-rescued-*/name` holding the whole run (report included), or None if it does not fit."""

    try:
        holder = Path(tempfile.mkdtemp(prefix="cnnkit-rescued-", dir=folder))
    except OSError:
        return None
    try:
        os.chmod(holder, 0o777 & ~current_umask())  # mkdtemp makes 0700
        write(holder / name)
        write_report(holder / name)
    except OSError:
        shutil.rmtree(holder, ignore_errors=True)
        return None
    return holder / name


def discard_run_files(staging: Path) -> None:
    """Remove the run files a failed write left in the staging directory; its checkpoint stays."""
    for path in staging.iterdir():
        if path.is_file() and not path.name.startswith("checkpoint"):
            path.unlink(missing_ok=True)


def write_final_report(run_dir: Path) -> None:
    """report.html of a committed run; if the disk refuses it, the run is still whole: say so and how to redo it."""
    try:
        write_report(run_dir)
    except OSError as error:
        problem = describe_os_error(error)
        if problem is None:
            raise
        raise RunNotWritten(f"the run is saved in {run_dir}, but its report.html could not be written ({problem}); "
                            f"then run: cnnkit report {run_dir}") from None


def train_metrics(config: TrainConfig, data: Dataset, history: History, report: EvalReport,
                  device: torch.device, threads: int, started: float) -> dict[str, Any]:
    epochs = len(history.epoch)
    return {
        "test_accuracy": report.accuracy,
        "test_accuracy_ci95": list(report.accuracy_ci95),
        "test_loss": report.loss,
        "balanced_accuracy": report.balanced_accuracy,  # on the test set, as test_accuracy
        "macro_f1": report.macro_f1,
        "train_class_counts": dict(zip(data.classes, class_counts(data.train.labels, len(data.classes)).tolist())),
        "imbalance": imbalance_record(data),
        "most_confused": [list(item) for item in report.most_confused()],
        "train_seconds": history.train_seconds,
        "total_seconds": time.perf_counter() - started,
        "seconds_per_epoch": history.train_seconds / epochs,
        "epochs": epochs,
        "model": config.model,
        "preset": config.preset,
        "dataset": data.name,
        "device": str(device),
        "threads": threads,
        "precision": config.precision,
        "flip": resolve_flip(config.flip, data.mirror_ok),
        "tta": config.tta,  # test_accuracy is that of the model with this test-time augmentation
        "peak_rss_mb": peak_rss_mb(),
        "val_accuracy": kept_val_accuracy(history),
        "selected": None if history.selected is None else history.selected.to_dict(),
        "val_source": data.val_source,
        "val_99_epoch": history.first_epoch_reaching("val_accuracy", TARGET_ACCURACY),
        "val_99_seconds": history.seconds_until("val_accuracy", TARGET_ACCURACY),
        "num_train": len(data.train),
        "num_val": len(data.val),
        "num_test": len(data.test),
        "test_report": report.to_dict(),
        "torch_version": torch.__version__,
    }


def imbalance_record(data: Dataset) -> dict[str, Any] | None:
    """{"ratio", "rare"} when the training classes differ by more than 2:1 (data.balance), else None."""
    found = imbalance_of(data.train.labels, data.classes)
    return None if found is None else {"ratio": found.ratio, "rare": list(found.rare)}


def kept_val_accuracy(history: History) -> float:
    """Validation accuracy of the weights the run kept (the selected epoch and source, e.g. EMA)."""
    selected = history.selected
    if not selected:
        return history.history["val_accuracy"][-1]
    return history.history[selected.key("val_accuracy")][history.epoch.index(selected.epoch)]


def write_run_files(run_dir: Path, config: TrainConfig, data: Dataset, model: torch.nn.Module,
                    history: History, report: EvalReport, metrics: dict[str, Any]) -> None:
    model.to("cpu", memory_format=torch.contiguous_format)
    metrics["weights_from"] = getattr(model, "weights_from", None)  # --init / --weights, or None: random
    save_model(run_dir, model, model_meta(config, data, model))
    if getattr(model, "code", None) is not None:  # the exact text that built the model, beside its hash
        with atomic_path(run_dir / SOURCE_COPY) as tmp:
            tmp.write_bytes(model.code.source)
    write_json(run_dir / "config.json", config.to_dict())
    write_text(run_dir / "history.csv", history.to_csv())
    write_text(run_dir / "steps.csv", history.steps_to_csv())
    write_json(run_dir / "metrics.json", metrics)
    # matplotlib is imported by the one stage that draws: at the top it cost 0.4 s of the start of every command
    # that imports cnnkit.api (evaluate, and a training refused before it draws), as much as cnnkit's imports but torch.
    from cnnkit.plots import plot_confusion_matrix, plot_history, plot_per_class  # matplotlib: see above

    title = f"{config.model} on {data.name}"
    best_epoch = None if history.selected is None else history.selected.epoch
    plot_history(history.history, run_dir / "history.png", title=title, best_epoch=best_epoch,
                 steps=history.steps)
    plot_confusion_matrix(report.confusion.numpy(), data.classes, run_dir / "confusion_matrix.png",
                          title=f"{title}: test accuracy {report.accuracy:.2%}")
    plot_per_class(data.classes, report.precision, report.recall, run_dir / "per_class.png", title=title)
    plot_misclassified(run_dir / "errors.png", data, report)
    explain_errors(run_dir / EXPLAINED_ERRORS, model, data, report)


def confident_errors(data: Dataset, report: EvalReport, count: int = ERROR_GRID_SIZE) -> torch.Tensor:
    """Indices of the test images the model got wrong, most confident first: the ones most worth a look."""
    labels = data.test.labels.cpu()
    wrong = (report.predictions != labels).nonzero().flatten()
    return wrong[report.confidences[wrong].argsort(descending=True)][:count]


def plot_misclassified(path: Path, data: Dataset, report: EvalReport) -> None:
    """The most confidently wrong test images, true and predicted labels."""
    from cnnkit.plots import plot_errors  # see write_run_files

    labels = data.test.labels.cpu()
    order = confident_errors(data, report)
    images = data.test.images.cpu()[order].numpy()
    plot_errors(images, [data.classes[i] for i in labels[order].tolist()],
                [data.classes[i] for i in report.predictions[order].tolist()],
                report.confidences[order].tolist(), path)


#: The most confident errors with their heatmaps (report.html shows it after errors.png).
EXPLAINED_ERRORS = "errors_why.png"
EXPLAINED_COUNT = 12


def explain_errors(path: Path, model: torch.nn.Module, data: Dataset, report: EvalReport) -> None:
    """The most confidently wrong test images, each with the Grad-CAM heatmap of the class it was taken for:
    where the evidence for the wrong answer lay. Written where the model has a spatial layer to read; a figure is
    never a reason for a finished run to fail."""
    if data.test.features or len(data.test) == 0:
        return
    from PIL import Image


    order = confident_errors(data, report, EXPLAINED_COUNT)
    if len(order) == 0:
        return
    images = data.test.images.cpu()[order].numpy()
    predicted = report.predictions[order].tolist()
    try:
        maps = explain(model, images, predicted)
    except Exception:  # noqa: BLE001 - no spatial layer, or a user's network Grad-CAM cannot read: no figure
        return
    truth = data.test.labels.cpu()[order].tolist()
    tiles = [overlay(image, heat, printable(f"{data.classes[t]} -> {data.classes[p]} ({c:.0%})")[:40], side=160)
             for image, heat, t, p, c in zip(images, maps, truth, predicted, report.confidences[order].tolist())]
    columns = min(6, len(tiles))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * 164, rows * 184), "white")
    for index, tile in enumerate(tiles):
        sheet.paste(tile, ((index % columns) * 164 + 2, (index // columns) * 184 + 2))
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")


def collect_metrics(config: TrainConfig, data: Dataset, history: History, report: EvalReport,
                    features: FeatureSummary | None, device: torch.device, threads: int, started: float,
                    world: World, probe: ProbeSummary | None = None) -> dict[str, Any]:
    """metrics.json's content: train_metrics, the processes, and what a frozen backbone's feature step or the
    probe before fine-tuning did (their time is training's)."""
    metrics = train_metrics(config, data, history, report, device, threads, started)
    metrics["processes"] = world.world_size
    if probe is not None:
        metrics["train_seconds"] += probe.seconds
        metrics["probe"] = probe.to_dict()
    if features is not None:  # the backbone's pass over train and validation images is part of training
        metrics["train_seconds"] += features.fit_seconds
        metrics["frozen_features"] = features.to_dict()
        metrics["flip"] = False  # fixed vectors: no image was mirrored, whatever --flip auto would do
    return metrics

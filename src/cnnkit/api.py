"""The verbs behind both the CLI and the Python API: train a run, evaluate it, predict with it."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnkit.config import TrainConfig, resolve_config
from cnnkit.data.tensors import Dataset, load_dataset
from cnnkit.engine.cpu import configure_cpu, peak_rss_mb
from cnnkit.errors import CnnkitError
from cnnkit.engine.evaluate import EvalReport, evaluate
from cnnkit.engine.callbacks import Callback, History
from cnnkit.engine.callbacks.selection import logs_key
from cnnkit.engine.fit import fit
from cnnkit.engine.inference import resolve_device, resolve_precision
from cnnkit.models import build_model, model_entry
from cnnkit.plots import plot_confusion_matrix, plot_errors, plot_history, plot_per_class
from cnnkit.preprocess import preprocessing_meta
from cnnkit.report import write_report
from cnnkit.runs import Run, load_run, save_model, staged_run, write_json
from cnnkit.fileio import write_text

ERROR_GRID_SIZE = 36
TARGET_ACCURACY = 0.99


@dataclass
class TrainResult:
    run_dir: Path
    history: History
    metrics: dict[str, Any]
    model: torch.nn.Module


def dataset_for(config: TrainConfig, progress: bool = True) -> Dataset:
    image_size = tuple(config.image_size) if config.image_size else None
    return load_dataset(config.dataset, config.data_dir, val=config.val, limit_train=config.limit_train,
                        limit_eval=config.limit_eval, image_size=image_size, channels=config.channels,
                        progress=progress)


def model_for(config: TrainConfig, data: Dataset) -> torch.nn.Module:
    """Build the configured model, seeded, standardising with train statistics where the model wants it."""
    mean = std = None
    if model_entry(config.model).standardize:
        mean, std = data.channel_stats()
    return build_model(config.model, data.input_shape, data.num_classes, mean=mean, std=std, seed=config.seed,
                       **config.model_kwargs)


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
        "cnnkit_version": _version(),
        "torch_version": torch.__version__,
    }


def _version() -> str:
    from cnnkit import __version__

    return __version__


def train(config: TrainConfig | None = None, *, progress: bool = True, started: float | None = None,
          log=print, callbacks: Sequence[Callback] = (), **overrides: Any) -> TrainResult:
    """Load data, build, fit, evaluate on the test set once, and write the run directory.

    `overrides` are TrainConfig options (e.g. `preset="fast", epochs=3`); `callbacks` go to fit().
    """
    started = time.perf_counter() if started is None else started
    config = config or resolve_config(**overrides)
    device = resolve_device(config.device)
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))  # what ran
    threads = configure_cpu(config.threads)
    with staged_run(config.runs_dir, config.name) as (staging, final):
        data = dataset_for(config, progress)
        if data.skipped:
            log(f"skipped {len(data.skipped)} unreadable files: {', '.join(data.skipped[:10])}"
                + (" ..." if len(data.skipped) > 10 else ""))
        log(f"{data.name}: {len(data.train):,} train / {len(data.val):,} validation ({data.val_source}) / "
            f"{len(data.test):,} test images, {data.num_classes} classes, input {data.input_shape}; "
            f"device {device}, {threads} threads")
        model = model_for(config, data)
        history = fit(model, data, callbacks=callbacks, progress=progress, **config.fit_options())
        test_split = data.test.to(device)
        report = evaluate(model, test_split, data.classes, batch_size=config.eval_batch_size)
        metrics = train_metrics(config, data, history, report, device, threads, started)
        write_run_files(staging, config, data, model, history, report, metrics)
    run_dir = final[0]
    write_report(run_dir)  # after the rename, so the page carries the run's final name; `cnnkit report` rebuilds it
    return TrainResult(run_dir, history, metrics, model)


def train_metrics(config: TrainConfig, data: Dataset, history: History, report: EvalReport,
                  device: torch.device, threads: int, started: float) -> dict[str, Any]:
    epochs = len(history.epoch)
    return {
        "test_accuracy": report.accuracy,
        "test_accuracy_ci95": list(report.accuracy_ci95),
        "test_loss": report.loss,
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
        "peak_rss_mb": peak_rss_mb(),
        "val_accuracy": kept_val_accuracy(history),
        "selected": history.selected,
        "val_source": data.val_source,
        "val_99_epoch": history.first_epoch_reaching("val_accuracy", TARGET_ACCURACY),
        "val_99_seconds": history.seconds_until("val_accuracy", TARGET_ACCURACY),
        "num_train": len(data.train),
        "num_val": len(data.val),
        "num_test": len(data.test),
        "test_report": report.to_dict(),
        "torch_version": torch.__version__,
    }


def kept_val_accuracy(history: History) -> float:
    """Validation accuracy of the weights the run kept (the selected epoch and source, e.g. EMA)."""
    selected = history.selected
    if not selected:
        return history.history["val_accuracy"][-1]
    key = logs_key(selected["weights"], "val_accuracy")
    return history.history[key][history.epoch.index(selected["epoch"])]


def write_run_files(run_dir: Path, config: TrainConfig, data: Dataset, model: torch.nn.Module,
                    history: History, report: EvalReport, metrics: dict[str, Any]) -> None:
    model.to("cpu", memory_format=torch.contiguous_format)
    save_model(run_dir, model, model_meta(config, data, model))
    write_json(run_dir / "config.json", config.to_dict())
    write_text(run_dir / "history.csv", history.to_csv())
    write_text(run_dir / "steps.csv", history.steps_to_csv())
    write_json(run_dir / "metrics.json", metrics)
    title = f"{config.model} on {data.name}"
    selected = history.selected or {}
    plot_history(history.history, run_dir / "history.png", title=title, best_epoch=selected.get("epoch"),
                 steps=history.steps)
    plot_confusion_matrix(report.confusion.numpy(), data.classes, run_dir / "confusion_matrix.png",
                          title=f"{title}: test accuracy {report.accuracy:.2%}")
    plot_per_class(data.classes, report.precision, report.recall, run_dir / "per_class.png", title=title)
    plot_misclassified(run_dir / "errors.png", data, report)


def plot_misclassified(path: Path, data: Dataset, report: EvalReport) -> None:
    """The most confidently wrong test images: the ones most worth a look."""
    labels = data.test.labels.cpu()
    wrong = (report.predictions != labels).nonzero().flatten()
    order = wrong[report.confidences[wrong].argsort(descending=True)][:ERROR_GRID_SIZE]
    images = data.test.images.cpu()[order].numpy()
    plot_errors(images, [data.classes[i] for i in labels[order].tolist()],
                [data.classes[i] for i in report.predictions[order].tolist()],
                report.confidences[order].tolist(), path)


def save_run(model: torch.nn.Module, data: Dataset, history: History, path: str | Path, *,
             config: TrainConfig | None = None) -> Path:
    """Save a model trained with `cnnkit.fit` as a run directory that every CLI verb accepts.

    The test set is evaluated once here, as `cnnkit train` does at its end. `config.json` records the
    dataset and architecture; pass the `config` you trained with to record the rest (lr, epochs, ...).
    `path` must not exist yet: the run is assembled beside it and renamed into place when complete.
    """
    started = time.perf_counter()
    path = Path(path)
    architecture = getattr(model, "architecture", None)
    if architecture is None:
        raise CnnkitError(f"save_run needs a model made by cnnkit.build_model, got {type(model).__name__}")
    if config is None:
        config = resolve_config(dataset=data.name, model=architecture, model_kwargs=model.model_kwargs,
                                epochs=max(1, len(history.epoch)), runs_dir=str(path.parent), name=path.name)
    device = next(model.parameters()).device
    with staged_run(path.parent, path.name) as (staging, _):
        report = evaluate(model, data.test.to(device), data.classes, batch_size=config.eval_batch_size)
        metrics = train_metrics(config, data, history, report, device, torch.get_num_threads(), started)
        write_run_files(staging, config, data, model, history, report, metrics)
    write_report(path)
    return path


def evaluate_run(run: str | Path | Run, data_dir: str | None = None, *, limit: int | None = None,
                 progress: bool = True, mirror: str | None = None) -> EvalReport:
    """Evaluate a saved run on its dataset's test split (only the test files are read or fetched).

    The data is looked for in `data_dir` alone when given; else in the run's recorded data_dir
    (config.json), then $CNNKIT_DATA or the default cache, where missing test files are downloaded.
    The run's model.json gives the input size and channels; `limit` takes the same seeded slice of the
    test set as training's `limit_eval`.
    """
    from cnnkit.data.sources import DataLocation, default_location
    from cnnkit.data.tensors import load_test_split
    from cnnkit.runs import recorded_data_dirs

    run = run if isinstance(run, Run) else load_run(run)
    channels, height, width = run.input_shape
    if data_dir:
        locations = [DataLocation(Path(data_dir).expanduser(), "--data-dir")]
    else:
        locations = [DataLocation(path, origin) for path, origin in recorded_data_dirs(run.path, run.config)]
        locations.append(default_location())
    data = load_test_split(run.meta["dataset"], locations=locations, limit=limit, mirror=mirror,
                           image_size=(height, width), channels=channels, progress=progress)
    if data.classes != run.classes:
        raise CnnkitError(f"{run.path}: the model's classes do not match dataset {data.name}'s")
    return evaluate(run.model, data.test, data.classes)


"""The verbs behind both the CLI and the Python API: train a run, evaluate it, predict with it."""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnkit.config import TrainConfig, resolve_config
from cnnkit.data.augment import resolve_flip
from cnnkit.data.disk import window_bytes
from cnnkit.data.tensors import Dataset, load_dataset
from cnnkit.engine.cpu import configure_cpu, peak_rss_mb
from cnnkit.errors import CnnkitError, RunNotWritten, TrainingDiverged, describe_os_error
from cnnkit.text import printable
from cnnkit.engine.evaluate import EvalReport, evaluate
from cnnkit.engine.callbacks import Callback, History
from cnnkit.engine.callbacks.checkpoint import Checkpoint
from cnnkit.engine.callbacks.selection import logs_key
from cnnkit.engine.checkpoint import CHECKPOINT_JSON, data_fingerprint, has_checkpoint, read_training_checkpoint
from cnnkit.engine.checkpoint import planned_epochs, read_checkpoint_document
from cnnkit.engine.distributed import World, init_distributed, shutdown_distributed
from cnnkit.engine.features import FeatureSummary, features_folder, frozen_features
from cnnkit.engine.fit import fit
from cnnkit.engine.inference import resolve_device, resolve_precision
from cnnkit.models import build_model, model_entry
from cnnkit.models.classifier import ImageClassifier, custom_architecture, takes_pixels
from cnnkit.models.user import (SOURCE_COPY, UserCode, build_body, check_classifier, load_function,
                                parse_file_spec, read_code, user_body, verified_code)
from cnnkit.models.tta import check_tta, with_tta
from cnnkit.plots import plot_confusion_matrix, plot_errors, plot_history, plot_per_class
from cnnkit.preprocess import preprocessing_meta
from cnnkit.report import write_report
from cnnkit.runs import DEFAULT_RUN_NAME, Run, check_free_space, format_size, load_run, save_model, staged_run
from cnnkit.runs import sweep_runs_dir, write_json
from cnnkit.fileio import atomic_path, expand_user_path, sweep_stale_temp_files, write_text

ERROR_GRID_SIZE = 36
TARGET_ACCURACY = 0.99


@dataclass
class TrainResult:
    run_dir: Path | None  # None on the processes other than rank 0 of a data-parallel run: it writes the run
    history: History
    metrics: dict[str, Any]
    model: torch.nn.Module


def dataset_for(config: TrainConfig, progress: bool = True, processes: int = 1) -> Dataset:
    """The configured dataset; `processes` data-parallel processes will each hold it (for --stream auto)."""
    image_size = tuple(config.image_size) if config.image_size else None
    return load_dataset(config.dataset, config.data_dir, val=config.val, limit_train=config.limit_train,
                        limit_eval=config.limit_eval, image_size=image_size, channels=config.channels,
                        progress=progress, stream=config.stream, processes=processes)


def streaming_note(data: Dataset, batch_size: int) -> str:
    """The log line of a dataset whose images stream from disk: how much is on disk, how much in memory."""
    images = data.train.images
    on_disk = sum(split.images.nbytes for split in (data.train, data.val, data.test) if split.on_disk)
    size = f"{on_disk / 1e9:.1f} GB" if on_disk >= 1e8 else f"{on_disk / 1e6:.0f} MB"
    return (f"images stream from {images.paths[0].parent} ({size} decoded): read in shuffled chunks, at most "
            f"{window_bytes(images.item_bytes, batch_size) / 2**20:.0f} MiB of them in memory at a time (--stream)")


def model_for(config: TrainConfig, data: Dataset, user_model: Any = None, code: UserCode | None = None,
              trust_code: bool = False) -> ImageClassifier:
    """Build the configured model, seeded, standardising with train statistics where the model wants it,
    then load its starting weights when `init` (an earlier run) or `weights` (a safetensors file) says so.

    `user_model` is a user's own network given as a Python object (TrainConfig.model then names it
    custom:<class>); a FILE.py:FUNCTION model is built by running that file's function (`code`, when
    already read and checked; an `init` run of such a model needs `trust_code` and the same file).
    """
    from cnnkit.models.transfer import init_from_run, init_meta, load_weights_file

    init = init_meta(config.init, config.model, config.model_kwargs) if config.init else None
    if init is not None and isinstance(init[1].get("code"), dict) and user_model is None:
        code = verified_code(config.model, init[1]["code"], trust_code, f"--init {config.init}")
    own = user_model is not None or parse_file_spec(config.model) is not None
    mean = std = None
    if init is not None:  # its features were learned on inputs standardised the earlier run's way
        mean, std = init[1]["preprocessing"]["mean"], init[1]["preprocessing"]["std"]
    elif config.pretrained is not None:  # the ImageNet weights' own normalisation, not this data's
        from cnnkit.models.pretrained import find_pretrained

        found = find_pretrained(config.model, config.pretrained)
        mean, std = found.normalisation(data.input_shape[0])
    elif own or model_entry(config.model).standardize:
        mean, std = data.channel_stats()
    if own:
        model = user_classifier(config, data, user_model, mean, std, code)
    else:
        model = build_model(config.model, data.input_shape, data.num_classes, mean=mean, std=std,
                            seed=config.seed, **config.model_kwargs)
    if init is not None:
        model.weights_from = init_from_run(model, config.init, *init, data.classes)
    elif config.pretrained is not None:
        from cnnkit.data.download import data_root
        from cnnkit.models.pretrained import load_pretrained

        cache = data_root(config.data_dir) / "weights"  # converted weights live with the data cache
        model.weights_from = {"kind": "pretrained", **load_pretrained(model.body, found, cache).to_dict()}
    elif config.weights is not None:
        model.weights_from = load_weights_file(model, config.weights)
    return model


def user_classifier(config: TrainConfig, data: Dataset, user_model: Any, mean, std,
                    code: UserCode | None = None) -> ImageClassifier:
    """A user's network (an object, or FILE.py:FUNCTION's result) inside the ImageClassifier every model
    ships in, so its input standardisation travels with it to prediction, export and serving."""
    if user_model is not None:
        code = None
        body = user_body(user_model, data.input_shape, data.num_classes, config.seed)
    else:
        code = code or read_code(config.model)
        label = f"model {config.model}: {code.function}"
        body = build_body(load_function(code, f"model {config.model}"), data.input_shape, data.num_classes,
                          config.model_kwargs, config.seed, label, code.path)
    if not isinstance(body, ImageClassifier):
        body = ImageClassifier(body, mean, std)
        body.architecture, body.model_kwargs, body.code = config.model, dict(config.model_kwargs), code
        body.input_shape = data.input_shape
    check_classifier(body, data.input_shape, data.num_classes, f"model {config.model}",
                     code.path if code else None)
    return body


def user_model_name(model: Any) -> tuple[str, dict[str, Any]]:
    """(architecture, model_kwargs) that a run records for a model given as a Python object."""
    if isinstance(model, ImageClassifier) and model.architecture:
        return model.architecture, dict(model.model_kwargs)
    return custom_architecture(model), {}


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
    from cnnkit import __version__

    return __version__


def run_callbacks(config: TrainConfig, run_dir: Path) -> list[Callback]:
    """The callbacks a run option adds, writing into the (staging) run directory so their files move with it."""
    if not config.tensorboard:
        return []
    from cnnkit.engine.callbacks.tensorboard import TensorBoardLogger

    return [TensorBoardLogger(run_dir / "tensorboard")]


def train(config: TrainConfig | None = None, *, progress: bool = True, started: float | None = None,
          log=print, callbacks: Sequence[Callback] = (), model: Any = None, trust_code: bool = False,
          **overrides: Any) -> TrainResult:
    """Load data, build, fit, evaluate on the test set once, and write the run directory.

    `overrides` are TrainConfig options (e.g. `preset="fast", epochs=3`), applied over `config` when both are
    given; `callbacks` go to fit().
    `model` is a registered name or FILE.py:FUNCTION (TrainConfig.model), or your own network: an
    nn.Module, or a callable (input_shape, num_classes) -> nn.Module (called with the seed set). It is
    wrapped in an ImageClassifier that standardises its input with the training set's statistics, and
    the run records it as custom:<class name>: load_run then needs the same code (`model=`).
    `trust_code` lets `init` start from a run whose model is a FILE.py (that very file, by SHA-256).
    """
    started = time.perf_counter() if started is None else started
    user_model = None
    if isinstance(model, str):
        overrides["model"] = model
    elif model is not None:
        user_model = model
    if config is not None and overrides:  # keywords refine a given config, as they refine a preset
        config = resolve_config(**{**config.to_dict(), **overrides})
    config = config or resolve_config(**overrides)
    if user_model is not None:
        architecture, kwargs = user_model_name(user_model)
        config = dataclasses.replace(config, model=architecture, model_kwargs=kwargs)
    device = resolve_device(config.device)
    config = dataclasses.replace(config, precision=resolve_precision(config.precision, device))  # what ran
    return _train_run(config, device, progress=progress, started=started, log=log, callbacks=callbacks,
                      user_model=user_model, trust_code=trust_code)


def resume(path: str | Path, *, progress: bool = True, started: float | None = None, log=print,
           callbacks: Sequence[Callback] = (), model: Any = None, threads: int | None = None,
           trust_code: bool = False) -> TrainResult:
    """Continue an unfinished run from its last checkpoint; it ends as the uninterrupted run would have.

    `path` is the unfinished run's directory (the `runs/.NAME.partial-*` that an interrupted training
    names) or its checkpoint.json. The run's own options are used, and its data must be the same (checked
    by fingerprint). A run trained on your own nn.Module needs it again as `model`; one of a FILE.py model
    needs `trust_code` and that very file (the SHA-256 its checkpoint records).
    """
    started = time.perf_counter() if started is None else started
    staging = resumable_dir(path)
    saved = read_training_checkpoint(staging)
    config = config_of(saved, staging)
    if threads is not None:
        config = dataclasses.replace(config, threads=threads)
    if config.model.startswith("custom:") and model is None:
        raise CnnkitError(f"{staging} trained your own network ({config.model}); resume it from Python with "
                          "cnnkit.resume(path, model=...) passing the same network")
    log(f"resuming {staging} after epoch {saved['epoch']} of {planned_epochs(saved, config.epochs)}")
    return _train_run(config, resolve_device(config.device), progress=progress, started=started, log=log,
                      callbacks=callbacks, user_model=model, staging=staging, saved=saved, trust_code=trust_code)


def recorded_config(path: str | Path) -> TrainConfig:
    """The options an unfinished run was started with, as its checkpoint records them (no tensors read)."""
    staging = resumable_dir(path)
    return config_of(read_checkpoint_document(staging)["state"], staging)


def config_of(state: dict[str, Any], staging: Path) -> TrainConfig:
    recorded = state.get("meta", {}).get("config")
    if not isinstance(recorded, dict):
        raise CnnkitError(f"{staging}: the checkpoint does not record the run's options")
    where = staging / CHECKPOINT_JSON
    return resolve_config(spell=lambda name: f"{where}: {name}", **recorded)  # a bad value names the file


def resumable_dir(path: str | Path) -> Path:
    """The unfinished run directory that `path` names, or a clear error (a finished run, no checkpoint)."""
    path = Path(path)
    directory = path.parent if path.name == CHECKPOINT_JSON else path
    if not directory.is_dir():
        directory = unfinished_run_named(path)
    if not has_checkpoint(directory):
        if (directory / "metrics.json").is_file():
            raise CnnkitError(f"{directory} is a finished run: nothing to resume (to train further from its weights, "
                              f"start a new run with --init {directory})")
        raise CnnkitError(f"{directory}: no checkpoint to resume from ({CHECKPOINT_JSON} missing)")
    return directory


def unfinished_run_named(path: Path) -> Path:
    """The one interrupted training of run name `path.name` (`.NAME.partial-*` beside it, with a checkpoint):
    after a crash `--resume runs/cut` finds it. None or several: a clear error listing what there is."""
    candidates = sorted(found for found in path.parent.glob(f".{glob.escape(path.name)}.partial-*")
                        if found.is_dir() and not found.is_symlink() and has_checkpoint(found))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise CnnkitError(f"{path}: {len(candidates)} interrupted trainings of that name; resume one of them: "
                          f"{', '.join(str(found) for found in candidates)}")
    raise CnnkitError(f"{path}: no such run directory (resume takes the directory an interrupted training named)")


def _train_run(config: TrainConfig, device: torch.device, *, progress: bool, started: float, log,
               callbacks: Sequence[Callback], user_model: Any, staging: Path | None = None,
               saved: dict[str, Any] | None = None, trust_code: bool = False) -> TrainResult:
    """train() and resume(): data, model, fit (from a checkpoint when `saved`), test once, run files.

    Under torchrun every process runs this; rank 0 alone stages and writes the run directory, logs and
    tests, the others train their share and return a result without a run directory.
    """
    threads = configure_cpu(config.threads)
    world = init_distributed(config.device)
    try:
        result = _train_process(config, device, world, threads, progress=progress, started=started, log=log,
                                callbacks=callbacks, user_model=user_model, staging=staging, saved=saved,
                                trust_code=trust_code)
    except BaseException:
        shutdown_distributed(wait=False)  # the other processes may never reach a barrier now
        raise
    shutdown_distributed()
    return result


def _train_process(config: TrainConfig, device: torch.device, world: World, threads: int, *, progress: bool,
                   started: float, log, callbacks: Sequence[Callback], user_model: Any, staging: Path | None,
                   saved: dict[str, Any] | None, trust_code: bool = False) -> TrainResult:
    main = world.is_main
    log = log if main else (lambda *args, **kwargs: None)
    runs_dir = staging.parent if staging else expand_user_path(config.runs_dir, "--runs-dir")
    if main and (swept := sweep_debris(runs_dir, config)):
        log(swept)
    stage = staged_run(config.runs_dir, config.name, staging=staging) if main else nullcontext((None, []))
    with stage as (staging, final):
        callbacks = [*callbacks, *(run_callbacks(config, staging) if main else [])]  # a missing extra fails first
        data = load_in_turn(config, progress and main, world)
        if config.stream == "auto" and data.name.startswith("imagefolder:"):  # record what ran: a resume does the same
            config = dataclasses.replace(config, stream="yes" if data.streamed else "no")
        fingerprint = dataset_fingerprint(data) if config.checkpoint or saved is not None else None
        if saved is not None and saved["meta"].get("data") != fingerprint:
            raise CnnkitError(f"the data of {config.dataset} differs from the data this run started with "
                              "(files added, removed or changed): a resumed run must see the same images")
        code = run_code(config, user_model, saved, trust_code)
        if config.checkpoint and main:
            record = {"config": config.to_dict(), "data": fingerprint}
            if code is not None:  # what a resume checks the file against
                record["code"] = {"path": str(code.path), "sha256": code.sha256, "function": code.function}
            callbacks.append(Checkpoint(staging, record, log=log))
            if saved is None:
                log(f"checkpoints go to {staging} after every epoch (if training stops: "
                    f"cnnkit train --resume {staging})")
        if main:
            for warning in data_warnings(config, data):
                warn(warning)
        processes = f", {world.world_size} processes" if world.distributed else ""
        log(f"{data.name}: {len(data.train):,} train / {len(data.val):,} validation ({data.val_source}) / "
            f"{len(data.test):,} test images, {data.num_classes} classes, input {data.input_shape}; "
            f"device {device}, {threads} threads{processes}")
        if data.streamed:
            log(streaming_note(data, config.batch_size))
        check_tta_for(config, data)  # before training, not after it
        model = model_for(config, data, user_model, code, trust_code)
        if main:
            check_room(staging, model, config, resuming=saved is not None)  # before training, not after it
        trained, fit_data, features = frozen_stage(config, model, data, device, world, log)
        history = fit(trained, fit_data, callbacks=callbacks, progress=progress and main, resume=saved,
                      **config.fit_options())
        test_split = fit_data.test.to(device)
        report = evaluate(with_tta(trained, config.tta), test_split, data.classes,
                          batch_size=config.eval_batch_size, world=world)  # each process scores its share
        if not main:
            return TrainResult(None, history, {}, model)
        check_finite_result(report)
        if warning := small_test_warning(report):
            warn(warning)
        metrics = train_metrics(config, data, history, report, device, threads, started)
        metrics["processes"] = world.world_size
        if features is not None:  # the backbone's pass over train and validation images is part of training
            metrics["train_seconds"] += features.fit_seconds
            metrics["frozen_features"] = features.to_dict()
            metrics["flip"] = False  # fixed vectors: no image was mirrored, whatever --flip auto would do
        write_or_rescue(staging, config.name or DEFAULT_RUN_NAME,
                        lambda folder: write_run_files(folder, config, data, model, history, report, metrics))
    run_dir = final[0]
    write_final_report(run_dir)  # after the rename, so the page carries the run's final name
    return TrainResult(run_dir, history, metrics, model)


def warn(message: str) -> None:
    """A word about the data: on stderr, whatever the verbosity (--quiet included)."""
    print(f"cnnkit: warning: {message}", file=sys.stderr, flush=True)


def data_warnings(config: TrainConfig, data: Dataset) -> list[str]:
    """What is wrong with the data for this run that training would not say: skipped files, and a batch larger
    than the training set (a preset made for 50,000 images takes one step an epoch on a few hundred)."""
    warnings = []
    if data.skipped:
        warnings.append(f"skipped {len(data.skipped)} unreadable file(s): "
                        f"{printable(', '.join(data.skipped[:10]))}{' ...' if len(data.skipped) > 10 else ''}")
    if config.batch_size > len(data.train) > 0:
        warnings.append(f"--batch-size {config.batch_size} is more than the {len(data.train):,} training images: "
                        "one step an epoch; for a small set try --batch-size 32 or 64")
    return warnings


#: A test accuracy known to worse than +-5 points (95% interval) says little: said after the run.
WIDE_INTERVAL = 0.05


def small_test_warning(report: EvalReport) -> str | None:
    low, high = report.accuracy_ci95
    if (high - low) / 2 <= WIDE_INTERVAL:
        return None
    total = int(report.confusion.sum())
    return (f"only {total:,} test images: the test accuracy {100 * report.accuracy:.1f}% is known only to "
            f"{100 * low:.0f}-{100 * high:.0f}% (95% interval); more test images narrow it")


def frozen_stage(config: TrainConfig, model: torch.nn.Module, data: Dataset, device: torch.device, world: World,
                 log) -> tuple[torch.nn.Module, Dataset, FeatureSummary | None]:
    """What fit() trains and on what: `model` on `data`, or with --freeze backbone its head on the backbone's
    cached features (engine/features.py), the head sharing `model`'s parameters."""
    if config.freeze != "backbone":
        return model, data, None
    if world.distributed:
        raise CnnkitError("--freeze backbone trains a head on cached features in one process: leave out --devices "
                          "and torchrun (the backbone pass is the only costly part, and it is done once)")
    head, features, summary = frozen_features(model, data, device=device, batch_size=config.eval_batch_size,
                                              folder=features_folder(config.data_dir), log=log)
    log(summary.describe())
    return head, features, summary


def run_code(config: TrainConfig, user_model: Any, saved: dict[str, Any] | None, trust_code: bool) -> UserCode | None:
    """The FILE.py:FUNCTION model's code, read once: as it is for a new run, checked against the checkpoint's
    record (and the opt-in) for a resumed one; None for other models."""
    if user_model is not None or parse_file_spec(config.model) is None:
        return None
    if saved is None:
        return read_code(config.model)
    return verified_code(config.model, saved["meta"].get("code"), trust_code, "--resume")


def sweep_debris(runs_dir: Path, config: TrainConfig) -> str | None:
    """Remove what killed cnnkit processes left behind (staging directories without a checkpoint, name
    claims, half-written files in the runs folder and partial downloads of this dataset); one line saying
    so, or None when there was nothing. Another process's work in progress is never touched (it holds
    its flock), nor an unfinished run that can be resumed."""
    sweep = sweep_runs_dir(runs_dir)
    folder = dataset_folder(config)
    if folder is not None:
        sweep.removed += sweep_stale_temp_files(folder)
    return sweep.message()


def dataset_folder(config: TrainConfig) -> Path | None:
    """Where a registry dataset's files are downloaded to (root/<name>/); None for an image folder."""
    from cnnkit.data.download import data_root, dataset_dir
    from cnnkit.data.registry import DATASETS

    spec = DATASETS.get(config.dataset.strip().lower())
    return None if spec is None else dataset_dir(spec, data_root(config.data_dir))


#: What a run's plots, report and JSON files take besides its weights: measured 0.55 MB for an MNIST run
#: (report.html 306 kB, the four figures 220 kB); colour error grids are larger, so twice that.
RUN_FILES_BYTES = 1_100_000
#: Copies of the weights in a checkpoint: the weights, Adam's two moments and the kept best epoch's
#: (measured 562,620 bytes for 138,576 bytes of weights); EMA adds its average.
CHECKPOINT_COPIES = 4


def check_room(staging: Path, model: torch.nn.Module, config: TrainConfig, *, resuming: bool) -> None:
    """Refuse, before training, a run whose files the runs folder's disk cannot hold.

    The need: the weights and the run's other files, plus two checkpoints when checkpointing (each epoch's
    is written before the previous one is removed; one when resuming, the previous one is already there).
    """
    weights = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    checkpoint = weights * (CHECKPOINT_COPIES + (config.ema is not None))
    copies = (1 if resuming else 2) if config.checkpoint else 0
    run = weights + RUN_FILES_BYTES
    detail = f"{format_size(weights)} of weights"
    if copies:
        detail += f", {format_size(copies * checkpoint)} for checkpoints"
    check_free_space(staging, run + copies * checkpoint, detail + ", plots and report",
                     without_checkpoints=run if copies else None)


def check_finite_result(report: EvalReport) -> None:
    """A test loss that is NaN or infinite is no result to record (weights that overflow on test images)."""
    if not math.isfinite(report.loss):
        raise TrainingDiverged(f"the test loss is {report.loss}: the trained weights overflow on the test images; "
                               "lower the learning rate (--lr), or train in fp32 (--precision fp32)")


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
            from cnnkit.engine.checkpoint import remove_checkpoint

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
    from cnnkit.fileio import current_umask

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


def load_in_turn(config: TrainConfig, progress: bool, world: World) -> Dataset:
    """The dataset; with several processes rank 0 loads first (downloads, decodes, fills the cache) and
    the others then read what it left, instead of all fetching and writing the same files at once.
    The others stream from disk or load into memory as rank 0 chose: every rank must draw the same order."""
    if not world.distributed:
        return dataset_for(config, progress)
    data = dataset_for(config, progress, processes=world.world_size) if world.is_main else None
    torch.distributed.barrier()
    streamed = rank0_flag(data is not None and data.streamed)
    if data is None:
        data = dataset_for(dataclasses.replace(config, stream="yes" if streamed else "no"), progress)
    return data


def rank0_flag(flag: bool) -> bool:
    """Rank 0's `flag`, on every rank of the process group (a tensor broadcast: no pickling)."""
    on_gpu = torch.distributed.get_backend() == "nccl"
    value = torch.tensor([int(flag)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    torch.distributed.broadcast(value, src=0)
    return bool(value.item())


def dataset_fingerprint(data: Dataset) -> str:
    splits = (data.train, data.val, data.test)
    return data_fingerprint(*(split.labels for split in splits), *(split.images for split in splits))


def check_tta_for(config: TrainConfig, data: Dataset) -> None:
    """Refuse a mirroring test-time augmentation on data whose mirror images are not of their class."""
    check_tta(config.tta, data.mirror_ok, resolve_flip(config.flip, data.mirror_ok), f"dataset {data.name}")


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
        "flip": resolve_flip(config.flip, data.mirror_ok),
        "tta": config.tta,  # test_accuracy is that of the model with this test-time augmentation
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
    metrics["weights_from"] = getattr(model, "weights_from", None)  # --init / --weights, or None: random
    save_model(run_dir, model, model_meta(config, data, model))
    if getattr(model, "code", None) is not None:  # the exact text that built the model, beside its hash
        with atomic_path(run_dir / SOURCE_COPY) as tmp:
            tmp.write_bytes(model.code.source)
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
    A plain nn.Module (trained by fit on float pixel values) is saved inside an ImageClassifier that casts
    the images so, and recorded as custom:<class name>: load_run needs its code again (`model=`).
    """
    started = time.perf_counter()
    path = Path(path)
    model = classifier_to_save(model, data)
    if config is None:
        config = resolve_config(dataset=data.name, model_kwargs=model.model_kwargs,
                                epochs=max(1, len(history.epoch)), runs_dir=str(path.parent), name=path.name)
        config = dataclasses.replace(config, model=model.architecture)  # custom:<class> is not an option value
    device = next(model.parameters()).device
    with staged_run(path.parent, path.name) as (staging, _):
        check_tta_for(config, data)
        report = evaluate(with_tta(model, config.tta), data.test.to(device), data.classes,
                          batch_size=config.eval_batch_size)
        metrics = train_metrics(config, data, history, report, device, torch.get_num_threads(), started)
        write_run_files(staging, config, data, model, history, report, metrics)
    write_report(path)
    return path


def classifier_to_save(model: torch.nn.Module, data: Dataset) -> ImageClassifier:
    """`model` as the ImageClassifier a run holds, named custom:<class> when no registry name describes it."""
    if isinstance(model, ImageClassifier):
        if model.architecture is None:
            model.architecture = custom_architecture(model.body)
        return model
    if not isinstance(model, torch.nn.Module) or takes_pixels(model):
        raise CnnkitError(f"save_run needs the trained nn.Module (or its ImageClassifier), got {type(model).__name__}")
    channels = data.input_shape[0]
    wrapped = ImageClassifier(model, [0.0] * channels, [1.0] * channels)  # fit gave it float pixel values
    wrapped.architecture, wrapped.input_shape = custom_architecture(model), data.input_shape
    return wrapped.to(next(model.parameters()).device)


def evaluate_run(run: str | Path | Run, data_dir: str | None = None, *, limit: int | None = None,
                 progress: bool = True, mirror: str | None = None, tta: str | None = None,
                 trust_code: bool = False) -> EvalReport:
    """Evaluate a saved run on its dataset's test split (only the test files are read or fetched).

    The data is looked for in `data_dir` alone when given; else in the run's recorded data_dir
    (config.json), then $CNNKIT_DATA or the default cache, where missing test files are downloaded.
    The run's model.json gives the input size and channels; `limit` takes the same seeded slice of the
    test set as training's `limit_eval`. `tta` overrides the run's recorded test-time augmentation.
    `trust_code` lets a run whose model is a user's file run that file (see load_run).
    """
    from cnnkit.data.folder import check_class_folders
    from cnnkit.data.sources import DataLocation, default_location
    from cnnkit.data.tensors import load_test_split
    from cnnkit.runs import recorded_data_dirs

    if not isinstance(run, Run) or (tta is not None and tta != run.tta):
        run = load_run(run.path if isinstance(run, Run) else run, tta=tta, trust_code=trust_code)
    channels, height, width = run.input_shape
    if data_dir:
        locations = [DataLocation(Path(data_dir).expanduser(), "--data-dir")]
    else:
        locations = [DataLocation(path, origin) for path, origin in recorded_data_dirs(run.path, run.config)]
        locations.append(default_location())
    check_class_folders(run.meta["dataset"], run.classes)  # before a wrong folder is decoded and cached
    data = load_test_split(run.meta["dataset"], locations=locations, limit=limit, mirror=mirror,
                           image_size=(height, width), channels=channels, progress=progress)
    if data.classes != run.classes:
        raise CnnkitError(f"{run.path}: the model's classes do not match dataset {data.name}'s")
    return evaluate(run.model, data.test, data.classes)


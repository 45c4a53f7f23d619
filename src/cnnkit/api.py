"""The verbs behind both the CLI and the Python API: train a run, evaluate it, predict with it."""

from __future__ import annotations

import dataclasses
import glob
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cnnkit.config import TrainConfig, resolve_config
from cnnkit.data.tensors import Dataset, load_test_split
from cnnkit.engine.callbacks import Callback, History
from cnnkit.engine.checkpoint import CHECKPOINT_JSON, has_checkpoint, read_training_checkpoint
from cnnkit.engine.checkpoint import planned_epochs, read_checkpoint_document
from cnnkit.engine.cpu import configure_cpu
from cnnkit.engine.distributed import (World, abandon_distributed, init_distributed, peers_watched,
                                      shutdown_distributed)
from cnnkit.engine.evaluate import EvalReport, evaluate
from cnnkit.engine.fit import fit
from cnnkit.engine.inference import resolve_device, resolve_precision
from cnnkit.errors import CnnkitError
from cnnkit.models.classifier import ImageClassifier, custom_architecture, takes_pixels
from cnnkit.models.tta import with_tta
from cnnkit.report import write_report
from cnnkit.runs import DEFAULT_RUN_NAME, Run, load_run, recorded_data_dirs, staged_run
from cnnkit.stages.data import check_tta_for, load_data, with_tta_resolved
from cnnkit.stages.model import model_for, run_code, user_model_name
from cnnkit.stages.prepare import check_room, checkpoint_callbacks, prepare_run, run_callbacks
from cnnkit.stages.testing import score_test_set
from cnnkit.stages.training import frozen_stage, probe_stage
from cnnkit.stages.write import collect_metrics, train_metrics, write_final_report, write_or_rescue, write_run_files
from cnnkit.data.folder import check_class_folders
from cnnkit.data.sources import DataLocation, default_location


@dataclass
class TrainResult:
    run_dir: Path | None  # None on the processes other than rank 0 of a data-parallel run: it writes the run
    history: History
    metrics: dict[str, Any]
    model: torch.nn.Module


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
    # Keywords refine a given config, as they refine a preset; a config built in Python meets the command line's
    # checks (options that cannot go together) here, before any data is read.
    if config is not None and overrides.get("preset") not in (None, config.preset):
        raise CnnkitError(f"preset={overrides['preset']!r} beside a TrainConfig would have to guess which of its "
                          "values are the defaults to replace: give the preset where the config is made "
                          "(TrainConfig(preset=..., ...) or cnnkit.resolve_config(preset, ...))")
    config = resolve_config(**{**(config.to_dict() if config is not None else {}), **overrides})
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
    needs `trust_code` and that very file (the SHA-256 its checkpoint records). A run of several processes
    (`devices` N) resumes in as many: from the command line, or in a script started by torchrun.
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
    # The record is every option of the run, so it is resolved without its preset: an option added to cnnkit (or
    # to the preset) since the run began takes its default, which is what the run had, not the preset's value.
    values = {name: value for name, value in recorded.items() if name != "preset"}
    config = resolve_config(spell=lambda name: f"{where}: {name}", **values)  # a bad value names the file
    return dataclasses.replace(config, preset=recorded.get("preset"))


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
        check_processes(config.devices, world, staging)
        result = _train_process(config, device, world, threads, progress=progress, started=started, log=log,
                                callbacks=callbacks, user_model=user_model, staging=staging, saved=saved,
                                trust_code=trust_code)
    except BaseException as error:
        abandon_distributed(error)
        raise
    shutdown_distributed()
    return result


def check_processes(devices: int, world: World, resuming: Path | None = None) -> None:
    """--devices N is what the command line's launcher starts; a run in Python starts none, so N > 1 must be the
    processes torchrun started (config.json records it: repeating the run starts that many). A run `resuming`
    continues as it began, in N processes."""
    if devices == 1 or devices == world.world_size:
        return
    if not world.distributed:
        command = f"cnnkit train --resume {resuming}" if resuming else f"cnnkit train --devices {devices}"
        raise CnnkitError(f"devices={devices} trains in {devices} processes, which a Python call cannot start: run "
                          f"`{command}`, or start this script with `torchrun --nproc-per-node {devices}`")
    raise CnnkitError(f"devices={devices}, but torchrun started {world.world_size} processes: give "
                      f"devices={world.world_size}, or leave it out under torchrun")


def _train_process(config: TrainConfig, device: torch.device, world: World, threads: int, *, progress: bool,
                   started: float, log, callbacks: Sequence[Callback], user_model: Any, staging: Path | None,
                   saved: dict[str, Any] | None, trust_code: bool = False) -> TrainResult:
    """One training, stage by stage (cnnkit/stages/): prepare the run, load the data, build the model, fit, test,
    write. Under torchrun every process runs it; rank 0 alone stages, warns, logs and writes."""
    main = world.is_main
    log = log if main else (lambda *args, **kwargs: None)
    with prepare_run(config, staging, main, log) as (staging, final):                                 # 1. prepare
        callbacks = [*callbacks, *(run_callbacks(config, staging) if main else [])]  # a missing extra fails first
        data, config, fingerprint = load_data(config, world, saved, progress=progress and main, device=device,
                                              threads=threads, log=log)                              # 2. data
        code = run_code(config, user_model, saved, trust_code)                                         # 3. model
        model = model_for(config, data, user_model, code, trust_code)
        if main:
            check_room(staging, model, config, resuming=saved is not None)  # before training, not after it
        probe = probe_stage(config, model, data, device, world, saved, log)                           # 4. fit
        if main:
            callbacks += checkpoint_callbacks(config, staging, fingerprint, code, saved, log, probe)
        trained, fit_data, features = frozen_stage(config, model, data, device, world, log)
        with peers_watched(world):
            history = fit(trained, fit_data, callbacks=callbacks, progress=progress and main, resume=saved,
                          config=config)
            report = score_test_set(config, trained, fit_data, data.classes, device, world)            # 5. test
        if not main:
            return TrainResult(None, history, {}, model)
        metrics = collect_metrics(config, data, history, report, features, device, threads, started, world, probe)  # 6.
        write_or_rescue(staging, config.name or DEFAULT_RUN_NAME,
                        lambda folder: write_run_files(folder, config, data, model, history, report, metrics))
    run_dir = final[0]
    write_final_report(run_dir)  # after the rename, so the page carries the run's final name
    return TrainResult(run_dir, history, metrics, model)


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
        config = with_tta_resolved(config, data)
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

    if not isinstance(run, Run) or (tta is not None and tta != run.tta):
        run = load_run(run.path if isinstance(run, Run) else run, tta=tta, trust_code=trust_code)
    channels, height, width = run.input_shape
    if data_dir:
        locations = [DataLocation(Path(data_dir).expanduser(), "--data-dir")]
    else:
        locations = [DataLocation(path, origin) for path, origin in recorded_data_dirs(run.path, run.config)]
        locations.append(default_location())
    check_class_folders(run.meta.dataset, run.classes)  # before a wrong folder is decoded and cached
    data = load_test_split(run.meta.dataset, locations=locations, limit=limit, mirror=mirror,
                           image_size=(height, width), channels=channels, progress=progress)
    if data.classes != run.classes:
        raise CnnkitError(f"{run.path}: the model's classes do not match dataset {data.name}'s")
    return evaluate(run.model, data.test, data.classes, batch_size=run.eval_batch_size)


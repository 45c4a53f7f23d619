"""Stage 1, prepare the run: sweep what killed runs left, check the disk has room, and the callbacks that write
into the (staging) run directory: checkpoints and TensorBoard."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cnnkit.config import TrainConfig
from cnnkit.engine.callbacks import Callback
from cnnkit.engine.callbacks.checkpoint import Checkpoint
from cnnkit.models.user import UserCode
from cnnkit.stages.training import ProbeSummary
from cnnkit.runs import check_free_space, format_size, staged_run, sweep_runs_dir
from cnnkit.fileio import expand_user_path, sweep_stale_temp_files
from cnnkit.engine.callbacks.tensorboard import TensorBoardLogger
from cnnkit.data.download import data_root, dataset_dir
from cnnkit.data.registry import DATASETS


def run_callbacks(config: TrainConfig, run_dir: Path) -> list[Callback]:
    """The callbacks a run option adds, writing into the (staging) run directory so their files move with it."""
    if not config.tensorboard:
        return []

    return [TensorBoardLogger(run_dir / "tensorboard")]


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


@contextlib.contextmanager
def prepare_run(config: TrainConfig, staging: Path | None, main: bool, log) -> Iterator[tuple[Path | None, list]]:
    """The run's staging directory (rank 0; None elsewhere) and the list its final path lands in once renamed,
    after sweeping what killed runs left in the runs folder. A resumed run brings its own `staging`."""
    runs_dir = staging.parent if staging else expand_user_path(config.runs_dir, "--runs-dir")
    if main and (swept := sweep_debris(runs_dir, config)):
        log(swept)
    staged = staged_run(config.runs_dir, config.name, staging=staging) if main else contextlib.nullcontext((None, []))
    with staged as made:
        yield made


def checkpoint_callbacks(config: TrainConfig, staging: Path, fingerprint: str | None, code: UserCode | None,
                         saved: dict[str, Any] | None, log, probe: ProbeSummary | None = None) -> list[Callback]:
    """The checkpoint writer, with what a resume checks against: the options, the data's fingerprint and a user
    file's SHA-256, and what a resume reports: the probe's summary (stages/training.py); none with
    --no-checkpoint."""
    if not config.checkpoint:
        return []
    record = {"config": config.to_dict(), "data": fingerprint}
    if probe is not None:
        record["probe"] = probe.to_dict()
    if code is not None:  # what a resume checks the file against
        record["code"] = {"path": str(code.path), "sha256": code.sha256, "function": code.function}
    if saved is None:
        log(f"checkpoints go to {staging} after every epoch (if training stops: cnnkit train --resume {staging})")
    return [Checkpoint(staging, record, log=log)]

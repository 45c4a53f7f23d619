"""Stage 2, load the data: rank by rank under torchrun, with its fingerprint, and the warnings about it that
training would not give (skipped files, a batch larger than the training set)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import torch

from cnnkit.data.balance import imbalance_of
from cnnkit.data.duplicates import copies_across
from cnnkit.config import TrainConfig
from cnnkit.data.augment import resolve_flip
from cnnkit.data.disk import window_bytes
from cnnkit.data.registry import image_folder
from cnnkit.data.tensors import Dataset, load_dataset
from cnnkit.errors import CnnkitError
from cnnkit.text import printable
from cnnkit.engine.checkpoint import data_fingerprint
from cnnkit.engine.distributed import World, barrier, rank0_flag
from cnnkit.models.tta import check_tta


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


def warn(message: str) -> None:
    """A word about the data: on stderr, whatever the verbosity (--quiet included)."""
    print(f"cnnkit: warning: {message}", file=sys.stderr, flush=True)


def data_warnings(config: TrainConfig, data: Dataset) -> list[str]:
    """What is wrong with the data for this run that training would not say: skipped files, and a batch larger
    than the training set (a preset made for 50,000 images takes one step an epoch on a few hundred)."""
    warnings = []
    if data.skipped:
        shown = ", ".join(map(str, data.skipped[:10]))
        warnings.append(f"skipped {len(data.skipped)} unreadable file(s): "
                        f"{printable(shown)}{' ...' if len(data.skipped) > 10 else ''}"
                        + ("; raise the pixel cap with --max-megapixels to use the large ones"
                           if any(item.refused for item in data.skipped) else ""))
    found = imbalance_of(data.train.labels, data.classes)
    if found is not None and config.class_weight == "none" and config.sampler == "shuffle":
        warnings.append(f"the training classes are imbalanced {printable(found.text())}: the model will favour "
                        "the common ones; --class-weight balanced or --sampler balanced train every class alike "
                        "(balanced accuracy is reported beside accuracy)")
    copies = test_copies_in_training(data)
    if copies:
        warnings.append(f"{copies:,} of the {len(data.test):,} test images are also in the training set (identical "
                        "pixels): the test accuracy partly measures memory; `cnnkit audit` lists them")
    if config.batch_size > len(data.train) > 0:
        warnings.append(f"--batch-size {config.batch_size} is more than the {len(data.train):,} training images: "
                        "one step an epoch; for a small set try --batch-size 32 or 64")
    return warnings


def test_copies_in_training(data: Dataset) -> int:
    """Test images with a pixel-identical copy among the training images (0.06 s for MNIST's 70,000). Images on
    disk or cached features are not read again for this: `cnnkit audit` checks those."""
    if data.train.on_disk or data.test.on_disk or data.train.features:
        return 0
    return copies_across(data.train.images.cpu(), data.test.images.cpu())


def load_in_turn(config: TrainConfig, progress: bool, world: World) -> Dataset:
    """The dataset; with several processes rank 0 loads first (downloads, decodes, fills the cache) and
    the others then read what it left, instead of all fetching and writing the same files at once.
    The others stream from disk or load into memory as rank 0 chose: every rank must draw the same order."""
    if not world.distributed:
        return dataset_for(config, progress)
    data = dataset_for(config, progress, processes=world.world_size) if world.is_main else None
    barrier(world)
    streamed = rank0_flag(data is not None and data.streamed, world)
    if data is None:
        data = dataset_for(dataclasses.replace(config, stream="yes" if streamed else "no"), progress)
    return data


def dataset_fingerprint(data: Dataset) -> str:
    splits = (data.train, data.val, data.test)
    return data_fingerprint(*(split.labels for split in splits), *(split.images for split in splits))


def with_tta_resolved(config: TrainConfig, data: Dataset) -> TrainConfig:
    """`tta auto` made what it means on this data: the mirror view where training mirrors images, else none. One
    preset then serves photos and digits alike, and the run records (and load_run applies) the views it scored."""
    if config.tta != "auto":
        return config
    mirrors = config.freeze != "backbone" and resolve_flip(config.flip, data.mirror_ok)
    return dataclasses.replace(config, tta="flip" if mirrors else "none")


def check_tta_for(config: TrainConfig, data: Dataset) -> None:
    """Refuse a mirroring test-time augmentation on data whose mirror images are not of their class."""
    check_tta(config.tta, data.mirror_ok, resolve_flip(config.flip, data.mirror_ok), f"dataset {data.name}")


def load_data(config: TrainConfig, world: World, saved: dict[str, Any] | None, *, progress: bool,
              device: torch.device, threads: int, log) -> tuple[Dataset, TrainConfig, str | None]:
    """The run's data (loaded rank by rank), the config with `stream` and `tta` resolved to what ran (a resume
    does the same), and the data's fingerprint when a checkpoint records it or a resume checks it."""
    data = load_in_turn(config, progress, world)
    if config.stream == "auto" and image_folder(data.name) is not None:
        config = dataclasses.replace(config, stream="yes" if data.streamed else "no")
    config = with_tta_resolved(config, data)
    fingerprint = dataset_fingerprint(data) if config.checkpoint or saved is not None else None
    if saved is not None and saved["meta"].get("data") != fingerprint:
        raise CnnkitError(f"the data of {config.dataset} differs from the data this run started with "
                          "(files added, removed or changed): a resumed run must see the same images")
    if world.is_main:
        for warning in data_warnings(config, data):
            warn(warning)
    processes = f", {world.world_size} processes" if world.distributed else ""
    log(f"{data.name}: {len(data.train):,} train / {len(data.val):,} validation ({data.val_source}) / "
        f"{len(data.test):,} test images, {data.num_classes} classes, input {data.input_shape}; "
        f"device {device}, {threads} threads{processes}")
    if data.streamed:
        log(streaming_note(data, config.batch_size))
    check_tta_for(config, data)  # before training, not after it
    return data, config, fingerprint

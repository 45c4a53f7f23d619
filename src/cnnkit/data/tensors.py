"""The in-memory dataset every loader ends as: uint8 image tensors + int64 labels + class names.

Images stay uint8 (4x smaller than float) and live on the training device; batches are sliced out
with one index tensor, so the training loop never touches a sample in Python and needs no DataLoader.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from cnnkit.errors import CnnkitError

#: Validation images held out of a 60k-size training set by default (else 10%).
DEFAULT_VAL_IMAGES = 5000
#: The split between train and validation depends on this alone, so every run of a dataset
#: validates on the same images whatever its training seed.
SPLIT_SEED = 0


@dataclass(repr=False)
class Split:
    """One split: images uint8 (N, C, H, W) and labels int64 (N,), on one device."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"Split({len(self):,} images {tuple(self.images.shape[1:])} uint8 on {self.images.device})"

    def to(self, device: torch.device | str, memory_format: torch.memory_format = torch.contiguous_format) -> Split:
        images = self.images.to(device).contiguous(memory_format=memory_format)
        return Split(images, self.labels.to(device))

    def take(self, index: torch.Tensor | slice) -> Split:
        return Split(self.images[index], self.labels[index])

    @classmethod
    def from_numpy(cls, images: np.ndarray, labels: np.ndarray) -> Split:
        return cls(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


@dataclass(repr=False)
class Dataset:
    """Train / validation / test splits of one dataset with its class names.

    `val_source` says where validation came from ("held-out" from train, "provided" by the source,
    or "test" when the user asked for the tutorial's protocol), so reports can say it honestly.
    """

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    val_source: str = "held-out"
    skipped: list[str] = field(default_factory=list)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, channels, height, width = self.train.images.shape
        return int(channels), int(height), int(width)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def mirror_ok(self) -> bool:
        """Whether a mirrored image keeps its class: photos and clothing yes, digits and characters no.

        What `flip=auto` follows (data/registry.py's per-dataset property; a colour image folder counts as
        photos, a grayscale one as characters). A Dataset made by hand with another name is never mirrored.
        """
        from cnnkit.data.registry import mirror_ok

        return mirror_ok(self.name, self.input_shape[0])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}: {len(self.train):,} train / {len(self.val):,} val ({self.val_source}) / "
                f"{len(self.test):,} test images, {self.num_classes} classes, input {self.input_shape})")

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, in pixel units (0-255)."""
        images = self.train.images
        # A strided sample of at most ~10k images: exact enough, and no 170 MB float64 copy of MNIST.
        sample = images[:: max(1, len(images) // 10000)].float()
        mean = sample.mean(dim=(0, 2, 3))
        std = sample.std(dim=(0, 2, 3)).clamp_min(1.0)
        return mean.tolist(), std.tolist()


def parse_val(val: str | int | float | None) -> str | int | float | None:
    """Accept the CLI's spellings of the validation choice: 'auto', 'test', an image count or a fraction."""
    if val is None or isinstance(val, (int, float)):
        return val
    text = str(val).strip().lower()
    if text in ("", "auto"):
        return None
    if text == "test":
        return "test"
    try:
        number = float(text)
    except ValueError:
        raise CnnkitError(f"--val must be 'auto', 'test', an image count or a fraction, got {val!r}") from None
    return number if 0 < number < 1 else int(number)


def split_validation(
    images: np.ndarray, labels: np.ndarray, val: int | float | None
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Hold out a validation set from the training arrays with a fixed seed."""
    total = len(labels)
    if val is None:
        count = DEFAULT_VAL_IMAGES if total >= 50000 else max(1, round(total * 0.1))
    elif isinstance(val, float):
        count = max(1, round(total * val))
    else:
        count = int(val)
    if not 0 < count < total:
        raise CnnkitError(f"cannot hold out {count} validation images from {total} training images")
    order = np.random.default_rng(SPLIT_SEED).permutation(total)
    val_idx, train_idx = np.sort(order[:count]), np.sort(order[count:])
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx])


def _limit(split: Split, limit: int | None) -> Split:
    """The first `limit` images of a seeded permutation: a small slice that still has every class."""
    if limit is None or limit >= len(split):
        return split
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(SPLIT_SEED))[:limit]
    return split.take(order.sort().values)


def load_dataset(
    name: str = "mnist",
    data_dir: str | None = None,
    *,
    val: str | int | float | None = None,
    download: bool = True,
    mirror: str | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    limit_train: int | None = None,
    limit_eval: int | None = None,
    progress: bool = True,
) -> Dataset:
    """Load a dataset by name (`mnist`, `cifar10`, `imagefolder:PATH`, ...) as uint8 CPU tensors.

    `val`: None/'auto' holds out the default validation set from train; an int or fraction holds out
    that many; 'test' uses the test set for validation (the tutorial's protocol; the final test
    report is then not independent, and the run records that). `limit_train`/`limit_eval` take
    seeded slices for quick trials and tests.
    """
    from cnnkit.data.sources import load_raw

    raw = load_raw(name, data_dir, download=download, mirror=mirror, image_size=image_size,
                   channels=channels, progress=progress)
    val = parse_val(val)
    if raw.test is None:
        raise CnnkitError(f"dataset {name} has no test split")
    train_arrays, val_arrays = raw.train, raw.val
    val_source = "provided"
    if val == "test":
        val_arrays, val_source = raw.test, "test"
    elif val_arrays is None or val is not None:
        if raw.val is not None:  # an explicit size re-splits train + provided val together
            train_arrays = (np.concatenate([raw.train[0], raw.val[0]]), np.concatenate([raw.train[1], raw.val[1]]))
        train_arrays, val_arrays = split_validation(*train_arrays, val)
        val_source = "held-out"
    return Dataset(
        name=raw.name,
        classes=list(raw.classes),
        train=_limit(Split.from_numpy(*train_arrays), limit_train),
        val=_limit(Split.from_numpy(*val_arrays), limit_eval),
        test=_limit(Split.from_numpy(*raw.test), limit_eval),
        val_source=val_source,
        skipped=list(raw.skipped),
    )


@dataclass
class TestSet:
    """A dataset's test split alone: what evaluating a saved model needs."""

    name: str
    classes: list[str]
    test: Split


def load_test_split(
    name: str,
    data_dir: str | None = None,
    *,
    locations=None,
    limit: int | None = None,
    download: bool = True,
    mirror: str | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    progress: bool = True,
) -> TestSet:
    """Load only the test split of a dataset, as `load_dataset(...).test` would give it.

    Only the test files are needed (or fetched): for an IDX dataset the two t10k files. `locations`
    (a sequence of cnnkit.data.sources.DataLocation) are searched in order for them, downloads going to
    the last; without it `data_dir` (else $CNNKIT_DATA, else the cache) is the one location. `limit` takes
    the same seeded slice as `load_dataset`'s `limit_eval`, so a run's reported test accuracy reproduces.
    """
    from pathlib import Path

    from cnnkit.data.download import data_root
    from cnnkit.data.sources import DataLocation, default_location, load_test_raw

    if locations is None:
        locations = [DataLocation(Path(data_root(data_dir)), "data_dir") if data_dir else default_location()]
    raw = load_test_raw(name, locations, download=download, mirror=mirror, image_size=image_size,
                        channels=channels, progress=progress)
    if raw.test is None:
        raise CnnkitError(f"dataset {name} has no test split")
    return TestSet(name=raw.name, classes=list(raw.classes), test=_limit(Split.from_numpy(*raw.test), limit))


def batch_indices(
    num_items: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[torch.Tensor]:
    """Index tensors for one epoch: shuffled when a generator is given, this rank's share when sharded.

    With several processes (data-parallel training) every rank draws the same permutation from an
    identically seeded generator and takes its part of each global batch (`shard_batches`), so no
    sampler object is needed and no image is dropped or repeated across ranks.
    """
    if generator is not None:
        order = torch.randperm(num_items, generator=generator)
    else:
        order = torch.arange(num_items)
    order = order.to(device)
    if world_size > 1:
        yield from shard_batches(order, batch_size, rank, world_size)
        return
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def shard_batches(order: torch.Tensor, batch_size: int, rank: int, world_size: int) -> Iterator[torch.Tensor]:
    """Rank `rank`'s batches of the permutation `order`, with `batch_size` images per rank per step.

    The permutation is cut into global batches of batch_size x world_size, and each global batch into
    world_size near-equal parts (sizes differ by at most one), part `rank` being this rank's. Every rank
    so takes the same number of steps (each DDP step is a collective: an extra step on one rank would
    hang the others), and the ranks' batches together cover the permutation exactly once. A last global
    batch too small to give every rank an image joins the one before it.
    """
    chunks = list(order.split(batch_size * world_size))
    if len(chunks) > 1 and len(chunks[-1]) < world_size:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    if len(chunks[0]) < world_size:
        raise CnnkitError(f"{len(order)} training images cannot feed {world_size} processes; use fewer processes")
    for chunk in chunks:
        yield chunk.tensor_split(world_size)[rank]


def batches_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> int:
    """How many batches batch_indices yields per epoch on every rank (drop_last off)."""
    global_batch = batch_size * world_size
    steps = -(-num_items // global_batch)
    if world_size > 1 and steps > 1 and num_items - (steps - 1) * global_batch < world_size:
        steps -= 1
    return steps

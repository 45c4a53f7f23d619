"""The in-memory dataset every loader ends as: uint8 image tensors + int64 labels + class names.

Images stay uint8 (4x smaller than float) and live on the training device; batches are sliced out
with one index tensor, so the training loop never touches a sample in Python and needs no DataLoader.
An image folder too large for memory is the exception: its splits' images stay in the decoded cache's
files (`DiskImages`, cnnkit.data.disk), and an epoch reads them in shuffled chunks (`train_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from cnnkit.data.balance import balanced_order
from cnnkit.data.cache import Skipped
from cnnkit.data.registry import image_folder, mirror_ok
from cnnkit.data.disk import ChunkWindow, DiskImages, chunked_order, fits_in_memory
from cnnkit.errors import CnnkitError
from cnnkit.data.sources import DataLocation, default_location, load_raw, load_test_raw
from cnnkit.data.download import data_root

#: Validation images held out of a 60k-size training set by default (else 10%).
DEFAULT_VAL_IMAGES = 5000
#: The split between train and validation depends on this alone, so every run of a dataset
#: validates on the same images whatever its training seed.
SPLIT_SEED = 0
#: Where a dataset's images are kept (TrainConfig.stream): auto (on disk only when memory is short), yes, no.
STREAM_CHOICES = ("auto", "yes", "no")
#: Images in the sample that standardisation statistics are measured on (a strided slice of train).
STATS_IMAGES = 10000


@dataclass(repr=False)
class Split:
    """One split: images uint8 (N, C, H, W) and labels int64 (N,), on one device.

    `images` is a tensor, or for a streamed image folder a DiskImages (read on demand, batches sent to the
    labels' device); both index the same way. A frozen backbone's cached features (engine/features.py) are a
    split too, float32 (N, D), so the head trains through the same fit() and is scored by the same evaluate().
    """

    images: torch.Tensor | DiskImages
    labels: torch.Tensor

    def __post_init__(self) -> None:
        pixels = self.images.dtype == torch.uint8 and self.images.ndim == 4
        if not pixels and not self.features:
            raise ValueError(f"images must be uint8 (N, C, H, W) or float32 features (N, D), got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        where = f"on disk, read to {self.images.device}" if self.on_disk else f"on {self.images.device}"
        kind = "feature vectors" if self.features else "images"
        dtype = str(self.images.dtype).removeprefix("torch.")
        return f"Split({len(self):,} {kind} {tuple(self.images.shape[1:])} {dtype} {where})"

    @property
    def on_disk(self) -> bool:
        return isinstance(self.images, DiskImages)

    @property
    def features(self) -> bool:
        """Whether this split holds feature vectors (N, D) rather than images."""
        return self.images.dtype == torch.float32 and self.images.ndim == 2

    def to(self, device: torch.device | str, memory_format: torch.memory_format = torch.contiguous_format) -> Split:
        if isinstance(self.images, DiskImages):  # the images stay on disk; what is read goes to `device`
            return Split(self.images.to(device, memory_format=memory_format), self.labels.to(device))
        images = self.images.to(device)
        images = images.contiguous() if self.features else images.contiguous(memory_format=memory_format)
        return Split(images, self.labels.to(device))

    def take(self, index: torch.Tensor | slice) -> Split:
        if isinstance(self.images, DiskImages):
            return Split(self.images.take(index), self.labels[index])
        return Split(self.images[index], self.labels[index])

    def loaded(self) -> Split:
        """This split with its images in memory (a copy read from disk when they were on disk)."""
        if isinstance(self.images, DiskImages):
            return Split(torch.from_numpy(self.images.load()), self.labels)
        return self

    @classmethod
    def from_numpy(cls, images: np.ndarray | DiskImages, labels: np.ndarray) -> Split:
        if not isinstance(images, DiskImages):
            images = torch.from_numpy(np.ascontiguousarray(images))
        return cls(images, torch.from_numpy(labels.astype(np.int64)))


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
    skipped: list[Skipped] = field(default_factory=list)  # an image folder's files that are not among its images

    @property
    def input_shape(self) -> tuple[int, int, int]:
        _, channels, height, width = self.train.images.shape
        return int(channels), int(height), int(width)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def streamed(self) -> bool:
        """Whether training reads its images from disk (an image folder too large for memory)."""
        return self.train.on_disk

    @property
    def mirror_ok(self) -> bool:
        """Whether a mirrored image keeps its class: photos and clothing yes, digits and characters no.

        What `flip=auto` follows (data/registry.py's per-dataset property; a colour image folder counts as
        photos, a grayscale one as characters). A Dataset made by hand with another name is never mirrored.
        """

        return mirror_ok(self.name, self.input_shape[0])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}: {len(self.train):,} train / {len(self.val):,} val ({self.val_source}) / "
                f"{len(self.test):,} test images, {self.num_classes} classes, input {self.input_shape})")

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, in pixel units (0-255)."""
        images = self.train.images
        # A strided sample of at most ~10k images: exact enough, and no 170 MB float64 copy of MNIST.
        if isinstance(images, DiskImages):
            return _channel_stats_on_disk(images.take(slice(None, None, max(1, len(images) // STATS_IMAGES))))
        sample = images[:: max(1, len(images) // STATS_IMAGES)].float()
        mean = sample.mean(dim=(0, 2, 3))
        std = sample.std(dim=(0, 2, 3)).clamp_min(1.0)
        return mean.tolist(), std.tolist()


def _channel_stats_on_disk(sample: DiskImages) -> tuple[list[float], list[float]]:
    """channel_stats of images on disk, read one chunk at a time (float64 sums: the same figures as the
    in-memory float32 reduction to ~1e-6)."""
    channels = sample.item_shape[0]
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for block in sample.blocks():
        pixels = block.astype(np.float32)
        total += pixels.sum(axis=(0, 2, 3), dtype=np.float64)
        squares += np.square(pixels).sum(axis=(0, 2, 3), dtype=np.float64)
        count += pixels.size // channels
    mean = total / max(1, count)
    variance = np.maximum(squares - count * mean**2, 0) / max(1, count - 1)  # unbiased, as torch.std
    return mean.tolist(), np.maximum(np.sqrt(variance), 1.0).tolist()


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
    return (_rows(images, train_idx), labels[train_idx]), (_rows(images, val_idx), labels[val_idx])


def _rows(images: np.ndarray | DiskImages, index: np.ndarray) -> np.ndarray | DiskImages:
    """The images at `index`: a copy of an array's rows, a view (nothing read) of images on disk."""
    return images.take(index) if isinstance(images, DiskImages) else images[index]


def _concat(first: np.ndarray | DiskImages, second: np.ndarray | DiskImages) -> np.ndarray | DiskImages:
    if isinstance(first, DiskImages) and isinstance(second, DiskImages):
        return first.concat(second)
    return np.concatenate([_in_memory(first), _in_memory(second)])


def _in_memory(images: np.ndarray | DiskImages) -> np.ndarray:
    return images.load() if isinstance(images, DiskImages) else images


def _placed(splits: dict[str, Split], stream: str, name: str, processes: int) -> dict[str, Split]:
    """The splits where they will be used: on disk when `stream` says so (auto: when twice their images
    would not fit comfortably in the available memory, see cnnkit.data.disk), else loaded into memory."""
    on_disk = [split for split in splits.values() if split.on_disk]
    if stream == "yes" and not on_disk:
        if image_folder(name) is not None:
            raise CnnkitError(f"--stream yes: the decoded images of {name} could not be written to the cache (see "
                              "the warning above), so they are in memory; pass --data-dir DIR with room for them")
        raise CnnkitError(f"--stream yes: dataset {name} is read into memory from its files; only imagefolder: "
                          "datasets stream from disk (use --stream auto)")
    if not on_disk or stream == "yes":
        return splits
    if stream == "auto" and not fits_in_memory(in_memory_peak(splits), processes):
        return splits
    return {key: split.loaded() for key, split in splits.items()}


def in_memory_peak(splits: dict[str, Split]) -> int:
    """Bytes the in-memory path takes at its peak for these splits on a CPU: train and validation twice (the
    arrays, and fit()'s channels_last copy), test once, and channel_stats' float32 sample of up to STATS_IMAGES
    training images (4x the images it covers: a 0.5 GB folder of 128x128 images peaked at 2.7 GB so)."""
    copies = {"train": 2, "val": 2, "test": 1}
    peak = sum(copies.get(key, 1) * split.images.nbytes for key, split in splits.items())
    if "train" in splits and len(splits["train"]):
        train = splits["train"]
        peak += 4 * min(len(train), STATS_IMAGES) * (train.images.nbytes // len(train))
    return peak


def _check_stream(stream: str) -> None:
    if stream not in STREAM_CHOICES:
        raise CnnkitError(f"--stream must be one of {', '.join(STREAM_CHOICES)}, got {stream!r}")


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
    stream: str = "auto",
    processes: int = 1,
) -> Dataset:
    """Load a dataset by name (`mnist`, `cifar10`, `imagefolder:PATH`, ...) as uint8 CPU tensors.

    `val`: None/'auto' holds out the default validation set from train; an int or fraction holds out
    that many; 'test' uses the test set for validation (the tutorial's protocol; the final test
    report is then not independent, and the run records that). `limit_train`/`limit_eval` take
    seeded slices for quick trials and tests.
    `stream`: an image folder's splits stay in its decoded cache (DiskImages) with 'yes', and with 'auto'
    when `processes` processes (data-parallel, on this machine) could not each hold them comfortably
    (`in_memory_peak`); 'no' always loads them. The images are the same either way; only the training order differs.
    """

    _check_stream(stream)
    try:
        raw = load_raw(name, data_dir, download=download, mirror=mirror, image_size=image_size,
                       channels=channels, progress=progress, on_disk=stream != "no")
    except MemoryError:
        raise CnnkitError(f"{name}: its decoded images do not fit in memory; --stream auto or yes reads them "
                          "from disk instead") from None
    val = parse_val(val)
    if raw.test is None:
        raise CnnkitError(f"dataset {name} has no test split")
    train_arrays, val_arrays = raw.train, raw.val
    val_source = "provided"
    if val == "test":
        val_arrays, val_source = raw.test, "test"
    elif val_arrays is None or val is not None:
        if raw.val is not None:  # an explicit size re-splits train + provided val together
            train_arrays = (_concat(raw.train[0], raw.val[0]), np.concatenate([raw.train[1], raw.val[1]]))
        train_arrays, val_arrays = split_validation(*train_arrays, val)
        val_source = "held-out"
    splits = {
        "train": _limit(Split.from_numpy(*train_arrays), limit_train),
        "val": _limit(Split.from_numpy(*val_arrays), limit_eval),
        "test": _limit(Split.from_numpy(*raw.test), limit_eval),
    }
    return Dataset(
        name=raw.name,
        classes=list(raw.classes),
        **_placed(splits, stream, raw.name, processes),
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
    stream: str = "auto",
) -> TestSet:
    """Load only the test split of a dataset, as `load_dataset(...).test` would give it.

    Only the test files are needed (or fetched): for an IDX dataset the two t10k files. `locations`
    (a sequence of cnnkit.data.sources.DataLocation) are searched in order for them, downloads going to
    the last; without it `data_dir` (else $CNNKIT_DATA, else the cache) is the one location. `limit` takes
    the same seeded slice as `load_dataset`'s `limit_eval`, so a run's reported test accuracy reproduces.
    `stream` is load_dataset's: an image folder's test split too large for memory is scored from disk.
    """
    from pathlib import Path


    if locations is None:
        locations = [DataLocation(Path(data_root(data_dir)), "data_dir") if data_dir else default_location()]
    _check_stream(stream)
    raw = load_test_raw(name, locations, download=download, mirror=mirror, image_size=image_size,
                        channels=channels, progress=progress, on_disk=stream != "no")
    if raw.test is None:
        raise CnnkitError(f"dataset {name} has no test split")
    test = _placed({"test": _limit(Split.from_numpy(*raw.test), limit)}, stream, raw.name, 1)["test"]
    return TestSet(name=raw.name, classes=list(raw.classes), test=test)


def train_batches(
    split: Split,
    batch_size: int,
    *,
    generator: torch.Generator | None,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    balanced: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (images, labels) batches on `device`, this rank's share of each global batch.
    `balanced`: the epoch's order is data.balance.balanced_order (each class equally often), images in memory.

    In memory: the images at `batch_indices` (a full permutation drawn from `generator`). On disk: the
    chunked order of cnnkit.data.disk drawn from the same generator, each chunk read once per epoch and each
    batch gathered from the window of chunks in memory; the sharding, and so the steps per epoch, are the
    same (`batches_per_epoch`). Memory bound: see cnnkit.data.disk.
    """
    if isinstance(split.images, DiskImages):
        yield from _streamed_batches(split, batch_size, generator, rank, world_size, torch.device(device))
        return
    order = balanced_order(split.labels, generator) if balanced else None
    for index in batch_indices(len(split), batch_size, generator=generator, rank=rank, world_size=world_size,
                               device=device, order=order):
        yield split.images[index], split.labels[index]


def _streamed_batches(split: Split, batch_size: int, generator: torch.Generator | None, rank: int, world_size: int,
                      device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """train_batches for images on disk: batches are ranges of the chunked order (positions in it cut as
    batch_indices cuts a permutation), gathered from a ChunkWindow."""
    images = split.images
    if generator is None:
        order, bounds = torch.arange(len(split)), list(range(0, len(split), images.chunk_rows)) + [len(split)]
    else:
        order, bounds = chunked_order(len(split), images.chunk_rows, generator)
    # A rank's batch holds at most batch_size + 1 images (shard_batches' last global batch).
    window = ChunkWindow(images, order, bounds, largest_batch=batch_size + 1)
    for positions in batch_indices(len(split), batch_size, rank=rank, world_size=world_size):
        start, stop = int(positions[0]), int(positions[-1]) + 1  # each batch is a run of positions
        # In the split's memory format, as an in-memory split's batches are (augmentation is 2x slower on NCHW
        # batches of channels_last-trained models: 3.3 s against 1.6 s an epoch of 8,240 128x128 images here).
        batch = window.batch(start, stop).to(device).contiguous(memory_format=images.memory_format)
        yield batch, split.labels[order[start:stop].to(split.labels.device)]
        del batch  # before the next batch is gathered: the heap can reuse its block


def batch_indices(
    num_items: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
    order: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Index tensors for one epoch: shuffled when a generator is given, this rank's share when sharded.

    With several processes (data-parallel training) every rank draws the same permutation from an
    identically seeded generator and takes its part of each global batch (`shard_batches`), so no
    sampler object is needed and no image is dropped or repeated across ranks.
    """
    if order is None:  # else drawn by the caller (a balanced epoch: num_items indices, with repeats)
        order = torch.randperm(num_items, generator=generator) if generator is not None else torch.arange(num_items)
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

"""The one door into the data layer: a dataset name in, uint8 arrays, labels and class names out.

Whatever the source (a registry dataset in IDX or CIFAR format, or a folder of images), the rest of
cnnkit sees the same RawData, already checked: images (N, C, H, W) uint8, labels int64 in range, and
image and label counts that agree. Problems with the files are CnnkitErrors naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data.cache import Skipped
from cnnkit.data.cifar import read_cifar10, read_cifar100
from cnnkit.data.download import DATA_ENV, data_root, dataset_dir, fetch_dataset, missing_files, split_roles
from cnnkit.data.idx import read_idx
from cnnkit.data.registry import IMAGEFOLDER_PREFIX, DatasetSpec, get_spec, image_folder
from cnnkit.errors import CnnkitError

__all__ = ["IMAGEFOLDER_PREFIX", "DataLocation", "RawData", "default_location", "load_raw", "load_test_raw"]

SPLITS = ("train", "test")
Split = tuple[np.ndarray, np.ndarray]


@dataclass
class RawData:
    """A dataset as plain arrays: images uint8 (N, C, H, W) C-contiguous (an image folder's may be DiskImages
    views of its decoded cache, see load_raw's `on_disk`), labels int64 (N,)."""

    name: str  # "mnist", or "imagefolder:/abs/path"
    classes: list[str]
    train: Split | None  # None only when the caller asked for the test split alone (load_test_raw)
    test: Split | None
    val: Split | None = None  # only when the source provides one (a folder's val/)
    skipped: list[Skipped] = field(default_factory=list)  # an image folder's files that are not among its images


def load_raw(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    mirror: str | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    progress: bool = True,
    splits: tuple[str, ...] = SPLITS,
    on_disk: bool = False,
) -> RawData:
    """Load a registry dataset (downloading it if allowed and missing) or `imagefolder:PATH`.

    `image_size` (height, width) and `channels` apply to image folders only; registry datasets come in
    their published shape. `splits` ("train", "test") says which splits a registry dataset must provide:
    only their files are needed and fetched (an IDX dataset's t10k files alone give its test split), and
    a split left out is None. Image folders always load whole; with `on_disk` their images stay in the
    decoded cache's files (cnnkit.data.disk.DiskImages) where it could be written.
    """
    unknown = [split for split in splits if split not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLITS}, got {splits}")
    root = data_root(data_dir)
    if (folder := image_folder(name)) is not None:
        return _load_folder(folder, root, image_size, channels, progress, on_disk)
    spec = get_spec(name)
    roles = split_roles(spec, splits)
    missing = missing_files(spec, root, roles)
    if missing:
        if not download:
            raise CnnkitError(
                f"{dataset_dir(spec, root)}: dataset {spec.name!r} is not downloaded (missing "
                f"{', '.join(path.name for path in missing)}); run `cnnkit datasets download {spec.name}` or pass "
                f"--data-dir pointing at a folder that holds {spec.name}/"
            )
        fetch_dataset(spec, root, mirror=mirror, progress=progress, roles=roles)
    folder = dataset_dir(spec, root)
    if spec.kind == "idx":
        return _load_idx(spec, folder, splits)
    return _load_cifar(spec, folder, splits)


@dataclass(frozen=True)
class DataLocation:
    """A data root to look in, and how it was chosen (for messages): "--data-dir", "$CNNKIT_DATA", ..."""

    path: Path
    origin: str

    def describe(self) -> str:
        return f"{self.path} ({self.origin})"


def default_location() -> DataLocation:
    """Where datasets go when no folder is named: $CNNKIT_DATA, else the user cache."""
    origin = f"${DATA_ENV}" if os.environ.get(DATA_ENV, "").strip() else "the default cache"
    return DataLocation(data_root(None), origin)


def load_test_raw(
    name: str,
    locations: Sequence[DataLocation],
    *,
    download: bool = True,
    mirror: str | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    progress: bool = True,
    on_disk: bool = False,
) -> RawData:
    """Load only the test split of `name`, from the first of `locations` that holds its test files.

    When none holds them they are fetched into the last location (only the test files: for an IDX dataset
    the two t10k files); a failure names what is missing and every place looked in. Nothing is created
    anywhere unless a download succeeds. An image folder is read as `load_raw` reads it, its decoded cache
    kept in the first location that exists (else the last).
    """
    if not locations:
        raise ValueError("load_test_raw needs at least one location")
    locations = _unique(locations)
    options = dict(download=download, mirror=mirror, image_size=image_size, channels=channels, progress=progress,
                   on_disk=on_disk)
    if image_folder(name) is not None:
        chosen = next((loc for loc in locations if loc.path.is_dir()), locations[-1])
        return load_raw(name, chosen.path, **options)
    spec = get_spec(name)
    roles = split_roles(spec, ("test",))
    chosen = next((loc for loc in locations if not missing_files(spec, loc.path, roles)), locations[-1])
    try:
        return load_raw(name, chosen.path, splits=("test",), **options)
    except CnnkitError as error:
        others = [loc for loc in locations if loc is not chosen]
        if not others or missing_files(spec, chosen.path, roles) == []:
            raise  # not a question of where the files are (e.g. a damaged file): the message says it all
        looked = "; ".join(loc.describe() for loc in others)
        raise CnnkitError(f"{error}; not found either in {looked}") from None


def _unique(locations: Sequence[DataLocation]) -> list[DataLocation]:
    """Drop a location that names the same folder as an earlier one."""
    seen: set[Path] = set()
    unique = []
    for location in locations:
        key = Path(os.path.abspath(location.path.expanduser()))
        if key not in seen:
            seen.add(key)
            unique.append(location)
    return unique


def _load_idx(spec: DatasetSpec, folder: Path, splits: tuple[str, ...] = SPLITS) -> RawData:
    """Read the IDX files of an MNIST-style dataset (two per split)."""
    train = _idx_split(spec, folder, "train") if "train" in splits else None
    test = _idx_split(spec, folder, "test") if "test" in splits else None
    return RawData(name=spec.name, classes=list(spec.classes), train=train, test=test)


def _idx_split(spec: DatasetSpec, folder: Path, split: str) -> Split:
    """Read one split's images and labels and check them against each other and the spec."""
    images_path = folder / spec.files[f"{split}_images"].filename
    labels_path = folder / spec.files[f"{split}_labels"].filename
    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    _, height, width = spec.shape
    if images.shape[1:] != (height, width) or images.dtype != np.uint8:
        raise CnnkitError(
            f"{images_path}: expected uint8 images of {height}x{width}, found {images.dtype} {images.shape[1:]}"
        )
    if len(images) != len(labels):
        raise CnnkitError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels; "
            "the files come from different datasets or one is damaged"
        )
    _check_labels(labels, len(spec.classes), labels_path)
    return images[:, None], labels.astype(np.int64)


def _load_cifar(spec: DatasetSpec, folder: Path, splits: tuple[str, ...] = SPLITS) -> RawData:
    """Read a CIFAR binary archive (one file holds both splits; a split not asked for is dropped)."""
    archive = folder / spec.files["archive"].filename
    reader = read_cifar10 if spec.kind == "cifar10" else read_cifar100
    train, test = reader(archive)
    train = train if "train" in splits else None
    test = test if "test" in splits else None
    for split in (train, test):
        if split is not None:
            _check_labels(split[1], len(spec.classes), archive)
    return RawData(name=spec.name, classes=list(spec.classes), train=train, test=test)


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    """Labels must index the class list; anything else means a damaged or mismatched file."""
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise CnnkitError(
            f"{path}: {bad.size} label(s) outside 0..{num_classes - 1} (e.g. {int(bad[0])}); "
            "the file is damaged or belongs to another dataset"
        )


def _load_folder(
    path: str, root: Path, image_size: tuple[int, int] | None, channels: int | None, progress: bool,
    on_disk: bool = False,
) -> RawData:
    """Load `imagefolder:PATH`, caching decoded arrays under the data root."""
    from cnnkit.data.folder import load_image_folder  # Pillow + multiprocessing only when a folder is used

    if not path:
        raise CnnkitError("imagefolder: needs a path, e.g. imagefolder:./photos")
    folder = Path(path).expanduser().resolve()
    data = load_image_folder(folder, root, image_size=image_size, channels=channels, progress=progress,
                             on_disk=on_disk)
    return RawData(
        name=f"{IMAGEFOLDER_PREFIX}{folder}",
        classes=data.classes,
        train=data.splits["train"],
        test=data.splits.get("test"),
        val=data.splits.get("val"),
        skipped=data.skipped,
    )

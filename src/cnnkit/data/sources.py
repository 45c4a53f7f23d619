"""The one door into the data layer: a dataset name in, uint8 arrays, labels and class names out.

Whatever the source (a registry dataset in IDX or CIFAR format, or a folder of images), the rest of
cnnkit sees the same RawData, already checked: images (N, C, H, W) uint8, labels int64 in range, and
image and label counts that agree. Problems with the files are CnnkitErrors naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cnnkit.data.cifar import read_cifar10, read_cifar100
from cnnkit.data.download import data_root, dataset_dir, dataset_present, fetch_dataset
from cnnkit.data.idx import read_idx
from cnnkit.data.registry import DatasetSpec, get_spec
from cnnkit.errors import CnnkitError

__all__ = ["IMAGEFOLDER_PREFIX", "RawData", "load_raw"]

IMAGEFOLDER_PREFIX = "imagefolder:"
Split = tuple[np.ndarray, np.ndarray]


@dataclass
class RawData:
    """A dataset as plain arrays: images uint8 (N, C, H, W) C-contiguous, labels int64 (N,)."""

    name: str  # "mnist", or "imagefolder:/abs/path"
    classes: list[str]
    train: Split
    test: Split | None
    val: Split | None = None  # only when the source provides one (a folder's val/)
    skipped: list[str] = field(default_factory=list)  # unreadable image files, relative to the folder


def load_raw(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    mirror: str | None = None,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    progress: bool = True,
) -> RawData:
    """Load a registry dataset (downloading it if allowed and missing) or `imagefolder:PATH`.

    `image_size` (height, width) and `channels` apply to image folders only; registry datasets come in
    their published shape.
    """
    root = data_root(data_dir)
    if name.startswith(IMAGEFOLDER_PREFIX):
        return _load_folder(name.removeprefix(IMAGEFOLDER_PREFIX), root, image_size, channels, progress)
    spec = get_spec(name)
    if not dataset_present(spec, root):
        if not download:
            raise CnnkitError(
                f"{dataset_dir(spec, root)}: dataset {spec.name!r} is not downloaded; run "
                f"`cnnkit datasets download {spec.name}` or pass --data-dir pointing at a folder that holds "
                f"{spec.name}/"
            )
        fetch_dataset(spec, root, mirror=mirror, progress=progress)
    folder = dataset_dir(spec, root)
    if spec.kind == "idx":
        return _load_idx(spec, folder)
    return _load_cifar(spec, folder)


def _load_idx(spec: DatasetSpec, folder: Path) -> RawData:
    """Read the four IDX files of an MNIST-style dataset."""
    train = _idx_split(spec, folder, "train")
    test = _idx_split(spec, folder, "test")
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


def _load_cifar(spec: DatasetSpec, folder: Path) -> RawData:
    """Read a CIFAR binary archive."""
    archive = folder / spec.files["archive"].filename
    reader = read_cifar10 if spec.kind == "cifar10" else read_cifar100
    train, test = reader(archive)
    for labels in (train[1], test[1]):
        _check_labels(labels, len(spec.classes), archive)
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
    path: str, root: Path, image_size: tuple[int, int] | None, channels: int | None, progress: bool
) -> RawData:
    """Load `imagefolder:PATH`, caching decoded arrays under the data root."""
    from cnnkit.data.folder import load_image_folder  # Pillow + multiprocessing only when a folder is used

    if not path:
        raise CnnkitError("imagefolder: needs a path, e.g. imagefolder:./photos")
    folder = Path(path).expanduser().resolve()
    data = load_image_folder(folder, root, image_size=image_size, channels=channels, progress=progress)
    return RawData(
        name=f"{IMAGEFOLDER_PREFIX}{folder}",
        classes=data.classes,
        train=data.splits["train"],
        test=data.splits.get("test"),
        val=data.splits.get("val"),
        skipped=data.skipped,
    )

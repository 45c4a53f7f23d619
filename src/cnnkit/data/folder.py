"""Your own images as a dataset: a folder of class subfolders, decoded once and cached as uint8 arrays.

Accepted layouts, with class names taken from the subfolder names:

    PATH/<class>/<image>                      -> train, plus a deterministic 10 % per-class test split
    PATH/{train,val,test}/<class>/<image>     -> the given splits (val and test optional)

Every image is decoded once with Pillow in worker processes, converted to one size and channel count,
and stored under `<cache>/imagefolder/<key>/` keyed by the folder listing, so loading an unchanged folder
again decodes nothing. Processes, not threads: for small JPEGs the work is Python-bound, so threads only
add GIL contention (50k CIFAR-10 JPEGs on 2 cores, median of 4: serial 4.2 s, 2 threads 4.6 s,
2 processes 2.4 s; a cached reload 0.6 s). Unreadable files are skipped and reported, not fatal: one bad
JPEG in 50k should not stop a run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write, write_text

__all__ = ["IMAGE_EXTENSIONS", "FolderData", "decode_image", "load_image_folder"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}  # fmt: skip
_SPLIT_ORDER = ("train", "val", "test")
AUTO_TEST_FRACTION = 0.10
CACHE_VERSION = 1
# Below this many images, starting worker processes costs more than it saves.
_PARALLEL_MIN_IMAGES = 2000
_GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION = 0x0112
_Probe = tuple[tuple[int, int], str]  # ((width, height) as displayed, Pillow mode)


@dataclass
class FolderData:
    """A decoded image folder: uint8 (N, C, H, W) images and int64 labels per split."""

    classes: list[str]
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # "train" always; "val" / "test" when present
    skipped: list[str] = field(default_factory=list)  # unreadable files, relative to the folder
    image_size: tuple[int, int] = (0, 0)  # (height, width)
    channels: int = 0
    from_cache: bool = False


class _Entry(NamedTuple):
    """One image file found by the scan (a NamedTuple: a scan makes tens of thousands of them)."""

    relpath: str  # posix path relative to the folder: the stable name used for hashing and reporting
    path: str
    size: int
    mtime_ns: int
    split: str = "train"
    label: int = -1


def load_image_folder(
    folder: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    progress: bool = False,
    workers: int | None = None,
) -> FolderData:
    """Load an image folder, decoding only when `cache_dir` holds no decoded copy of this exact listing.

    `image_size` is (height, width); by default the most common size in the folder. `channels` is 1 or 3;
    by default 1 when every image is grayscale, else 3 (transparent pixels composited on white).
    """
    root = Path(folder).expanduser().resolve()
    if channels not in (None, 1, 3):
        raise CnnkitError(f"{root}: channels must be 1 or 3, got {channels}")
    if image_size is not None:
        image_size = (int(image_size[0]), int(image_size[1]))
        if min(image_size) < 1:
            raise CnnkitError(f"{root}: image size must be positive, got {image_size}")
    classes, entries = _scan(root)
    key = _cache_key(entries, image_size, channels)
    entry_dir = Path(cache_dir) / "imagefolder" / key if cache_dir is not None else None
    if entry_dir is not None:
        cached = _read_cache(entry_dir)
        if cached is not None:
            return cached
    try:
        data = _decode_all(root, classes, entries, image_size, channels, progress=progress, workers=workers)
    except BrokenProcessPool:
        # Spawned workers die at once when the calling script lacks `if __name__ == "__main__":`;
        # slower in-process decoding beats failing.
        warnings.warn("image decoding workers could not start; decoding in this process", stacklevel=2)
        data = _decode_all(root, classes, entries, image_size, channels, progress=progress, workers=1)
    if entry_dir is not None:
        _write_cache(entry_dir, data, source=root, request=(image_size, channels))
    return data


def decode_image(
    source: str | os.PathLike[str] | BinaryIO | Image.Image, image_size: tuple[int, int], channels: int
) -> np.ndarray:
    """Decode one image to uint8 (channels, height, width) exactly as folder datasets are decoded.

    Public so prediction can preprocess a user's image the same way the training images were.
    """
    if isinstance(source, Image.Image):
        return _to_array(source, image_size, channels)
    with Image.open(source) as image:
        return _to_array(image, image_size, channels)


# ---------------------------------------------------------------------------------------------------------
# Scanning: find the images, their classes and splits


def _scan(root: Path) -> tuple[list[str], list[_Entry]]:
    """List every image under `root` with its split and label; raise when there is nothing to train on."""
    if not root.is_dir():
        raise CnnkitError(f"{root}: not a folder (imagefolder:PATH needs a folder of class subfolders)")
    split_dirs = _split_dirs(root)
    if split_dirs:
        by_split = {split: _class_files(path, f"{path.name}/") for split, path in split_dirs.items()}
    else:
        by_split = {"train": _class_files(root, "")}
    train_classes = sorted(name for name, files in by_split["train"].items() if files)
    where = root / split_dirs["train"].name if split_dirs else root
    if not train_classes:
        raise CnnkitError(
            f"{where}: no images found (expected <class>/<image> files with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if len(train_classes) < 2:
        raise CnnkitError(
            f"{where}: only one class folder with images ({train_classes[0]!r}); a classifier needs at least two"
        )
    for split, class_files in by_split.items():
        extra = sorted(name for name, files in class_files.items() if files and name not in train_classes)
        if extra:
            raise CnnkitError(
                f"{split_dirs[split]}: class folder(s) {', '.join(extra)} have no images in "
                f"{split_dirs['train'].name}/; every class needs training images"
            )
    label_of = {name: index for index, name in enumerate(train_classes)}
    entries = [
        file._replace(split=split, label=label_of[name])
        for split, class_files in by_split.items()
        for name, files in sorted(class_files.items())
        for file in files
    ]
    if not split_dirs:
        entries = _assign_auto_test(entries)
    # Grouped by split (stable, so class then path order within each): every split becomes a slice of one
    # decoded array instead of a copy.
    entries.sort(key=lambda entry: _SPLIT_ORDER.index(entry.split))
    return train_classes, entries


def _split_dirs(root: Path) -> dict[str, Path]:
    """Map train/val/test to their folders when `root` uses the split layout, else return {}."""
    subdirs = [path for path in _visible(root) if path.is_dir()]
    splits: dict[str, Path] = {}
    for path in subdirs:
        split = SPLIT_ALIASES.get(path.name.lower())
        if split is None:
            continue
        if split in splits:
            raise CnnkitError(f"{root}: both {splits[split].name}/ and {path.name}/ look like the {split} split")
        splits[split] = path
    if not splits:
        return {}
    others = sorted(path.name for path in subdirs if path.name.lower() not in SPLIT_ALIASES)
    if others:
        raise CnnkitError(
            f"{root}: mixes split folders ({', '.join(sorted(p.name for p in splits.values()))}) with other "
            f"folders ({', '.join(others)}); put class folders inside train/, val/, test/"
        )
    if "train" not in splits:
        raise CnnkitError(f"{root}: has {', '.join(p.name for p in splits.values())}/ but no train/ folder")
    return splits


def _class_files(split_root: Path, prefix: str) -> dict[str, list[_Entry]]:
    """Images per class folder (searched recursively), sorted so the order never depends on the file system."""
    return {
        path.name: _images_under(str(path), f"{prefix}{path.name}") for path in _visible(split_root) if path.is_dir()
    }


def _images_under(folder: str, relative: str) -> list[_Entry]:
    """All visible image files below `folder`, skipping hidden and macOS resource-fork folders.

    Plain strings and os.scandir rather than pathlib: for 50k files pathlib's parsing alone took 0.8 s,
    and this scan runs on every load, cached or not.
    """
    found = []
    pending = [(folder, relative)]
    while pending:
        directory, rel = pending.pop()
        with os.scandir(directory) as listing:
            for item in listing:
                if _hidden(item.name):
                    continue
                if item.is_dir(follow_symlinks=False):
                    pending.append((item.path, f"{rel}/{item.name}"))
                elif os.path.splitext(item.name)[1].lower() in IMAGE_EXTENSIONS and item.is_file():
                    stat = item.stat()
                    found.append(_Entry(f"{rel}/{item.name}", item.path, stat.st_size, stat.st_mtime_ns))
    found.sort()
    return found


def _visible(folder: Path) -> list[Path]:
    """Entries of `folder` that are not hidden (.DS_Store, .ipynb_checkpoints) nor __MACOSX."""
    return sorted(path for path in folder.iterdir() if not _hidden(path.name))


def _hidden(name: str) -> bool:
    """True for names a user never meant as data: dot files and the __MACOSX folder zip tools add."""
    return name.startswith(".") or name == "__MACOSX"


def _assign_auto_test(entries: list[_Entry]) -> list[_Entry]:
    """Move 10 % of each class to "test", chosen by a hash of the relative path.

    A hash rather than a seeded shuffle: the split is the same on every machine and every run, and adding
    or removing one image moves at most that image between splits.
    """
    by_label: dict[int, list[_Entry]] = {}
    for entry in entries:
        by_label.setdefault(entry.label, []).append(entry)
    test_paths: set[str] = set()
    for members in by_label.values():
        count = _auto_test_count(len(members))
        ranked = sorted(members, key=lambda entry: hashlib.sha256(entry.relpath.encode()).hexdigest())
        test_paths.update(entry.relpath for entry in ranked[:count])
    return [entry._replace(split="test") if entry.relpath in test_paths else entry for entry in entries]


def _auto_test_count(class_size: int) -> int:
    """Test images for a class: 10 % rounded, at least one when the class has two or more images."""
    if class_size < 2:
        return 0
    return max(1, round(class_size * AUTO_TEST_FRACTION))


# ---------------------------------------------------------------------------------------------------------
# Decoding


def _decode_all(
    root: Path,
    classes: list[str],
    entries: list[_Entry],
    image_size: tuple[int, int] | None,
    channels: int | None,
    *,
    progress: bool,
    workers: int | None,
) -> FolderData:
    """Decode every image in one parallel pass; a second pass only when an inferred target was wrong.

    An inferred size or channel count depends on all images but is needed before decoding. A guess from a
    sample spread over the listing is almost always right, and every decoded image reports its own size
    and mode, so the guess is checked against the whole folder afterwards. This saves the separate
    header-reading pass over every file (0.7 s of 3 s for 50k CIFAR JPEGs on 2 cores).
    """
    paths = [entry.path for entry in entries]
    inferring = image_size is None or channels is None
    with _executor(len(paths), workers) as executor:
        sample = _probe_chunk(paths[:: max(1, len(paths) // 256)]) if inferring else []
        target = _infer_target([probe for probe in sample if probe is not None], image_size, channels)
        images, decoded, probes = _decode_paths(executor, paths, target, progress)
        if inferring and decoded.any():
            seen = [probe for probe, ok in zip(probes, decoded, strict=True) if ok and probe is not None]
            actual = _infer_target(seen, image_size, channels)
            if actual != target:
                del images
                target = actual
                images, decoded, _ = _decode_paths(executor, paths, target, progress)
    if not decoded.any():
        raise CnnkitError(f"{root}: none of the {len(paths)} image files could be decoded")
    if not decoded.all():
        images = images[decoded]
    splits = _split_arrays(images, [entry for entry, ok in zip(entries, decoded, strict=True) if ok])
    if len(np.unique(splits["train"][1])) < 2:
        raise CnnkitError(f"{root}: fewer than two classes have readable training images")
    (height, width), channel_count = target
    return FolderData(
        classes=classes,
        splits=splits,
        skipped=sorted(entry.relpath for entry, ok in zip(entries, decoded, strict=True) if not ok),
        image_size=(height, width),
        channels=channel_count,
    )


def _infer_target(
    probes: Sequence[_Probe], image_size: tuple[int, int] | None, channels: int | None
) -> tuple[tuple[int, int], int]:
    """The requested size and channels, with missing ones taken from the images' sizes and modes."""
    if not probes:  # nothing readable in the sample: any target will do, the full pass corrects it
        return image_size or (32, 32), channels or 3
    size = image_size or _most_common_size(probes)
    return size, channels or (1 if all(mode in _GRAYSCALE_MODES for _, mode in probes) else 3)


def _decode_paths(
    executor: Executor, paths: list[str], target: tuple[tuple[int, int], int], progress: bool
) -> tuple[np.ndarray, np.ndarray, list[_Probe | None]]:
    """Decode all paths to `target`: (N, C, H, W) images, a mask of which decoded, and each one's probe."""
    (height, width), channels = target
    # Filled in place as chunks arrive, so peak memory is the dataset once, not twice.
    images = np.empty((len(paths), channels, height, width), np.uint8)
    decoded = np.zeros(len(paths), bool)
    probes: list[_Probe | None] = [None] * len(paths)

    def keep(start: int, part: tuple[np.ndarray, np.ndarray, list[_Probe | None]]) -> None:
        arrays, ok, chunk_probes = part
        images[start : start + len(ok)][ok] = arrays
        decoded[start : start + len(ok)] = ok
        probes[start : start + len(ok)] = chunk_probes

    _run_chunks(executor, _decode_chunk, paths, ((height, width), channels), keep, "Decoding images", progress)
    return images, decoded, probes


def _split_arrays(images: np.ndarray, entries: Sequence[_Entry]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cut the decoded images into splits: entries are grouped by split, so each is a contiguous slice."""
    split_names = [entry.split for entry in entries]
    labels = np.array([entry.label for entry in entries], dtype=np.int64)
    splits = {}
    for split in _SPLIT_ORDER:
        if split in split_names:
            start = split_names.index(split)
            stop = start + split_names.count(split)
            splits[split] = (images[start:stop], labels[start:stop])
    return splits


def _most_common_size(probes: Sequence[tuple[tuple[int, int], str]]) -> tuple[int, int]:
    """The most frequent (height, width), ties broken towards the larger then the first-sorted size."""
    counts = Counter((height, width) for (width, height), _ in probes)
    return max(sorted(counts), key=lambda size: (counts[size], size[0] * size[1]))


def _executor(count: int, workers: int | None) -> Executor:
    """Worker processes for big folders, an in-process executor for small ones or `workers=1`.

    `workers=None` picks one per core (at most 8) from _PARALLEL_MIN_IMAGES images up; an explicit
    count is obeyed as given.
    """
    if workers is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = min(available, 8) if count >= _PARALLEL_MIN_IMAGES else 1
    if workers <= 1:
        return _InlineExecutor()
    return ProcessPoolExecutor(workers, mp_context=_process_context())


def _process_context() -> multiprocessing.context.BaseContext:
    """fork where it is safe and cheap (Linux, no other threads), else spawn.

    Fork starts workers in milliseconds without re-importing anything (the package's __init__ may import
    torch, which would cost each spawned worker seconds); with other threads alive a fork can copy a held
    lock, so then spawn it is.
    """
    if sys.platform == "linux" and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _run_chunks(
    executor: Executor,
    function: Callable,
    paths: list[str],
    extra: tuple,
    on_result: Callable[[int, Any], None],
    label: str,
    progress: bool,
) -> None:
    """Run `function` over the paths in chunks, handing each chunk's result to `on_result(start, result)`."""
    if not paths:
        return
    chunk = max(64, min(2048, len(paths) // 32 or 1))
    # Submit everything before the progress display starts its thread (a fork then copies only this one).
    futures = {
        executor.submit(function, paths[start : start + chunk], *extra): start for start in range(0, len(paths), chunk)
    }
    try:
        with _progress_bar(label, len(paths), progress) as advance:
            for future in as_completed(futures):
                start = futures[future]
                on_result(start, future.result())
                advance(min(chunk, len(paths) - start))
    except BaseException:
        for future in futures:  # Ctrl-C or a failure: do not make the caller wait for the queued chunks
            future.cancel()
        raise


def _probe_chunk(paths: Sequence[str]) -> list[_Probe | None]:
    """The probe of each image (header only, no pixel decoding), None for files Pillow cannot open."""
    probes: list[_Probe | None] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                probes.append(_probe(image))
        except Exception:  # noqa: BLE001 - any unreadable file is skipped and reported by name
            probes.append(None)
    return probes


def _probe(image: Image.Image) -> _Probe:
    """((width, height) as displayed, i.e. after EXIF rotation, mode) of an opened image."""
    width, height = image.size
    if _orientation(image) in (5, 6, 7, 8):  # rotated by 90 degrees: width and height swap
        width, height = height, width
    return (width, height), image.mode


def _decode_chunk(
    paths: Sequence[str], image_size: tuple[int, int], channels: int
) -> tuple[np.ndarray, np.ndarray, list[_Probe | None]]:
    """Decode a chunk: one (k, C, H, W) array of the good images, a mask of which decoded, each one's probe.

    One stacked array per chunk pickles far faster than thousands of small ones between processes.
    """
    height, width = image_size
    arrays = np.empty((len(paths), channels, height, width), np.uint8)
    ok = np.zeros(len(paths), bool)
    probes: list[_Probe | None] = []
    for position, path in enumerate(paths):
        try:
            with Image.open(path) as image:
                probes.append(_probe(image))
                arrays[position] = _to_array(image, image_size, channels)
            ok[position] = True
        except Exception:  # noqa: BLE001 - any unreadable or undecodable file is skipped and reported
            if len(probes) == position:
                probes.append(None)
    return arrays[ok], ok, probes


def _to_array(image: Image.Image, image_size: tuple[int, int], channels: int) -> np.ndarray:
    """Orient, convert and resize one opened image to uint8 (channels, height, width)."""
    height, width = image_size
    orientation = _orientation(image)
    if image.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is much smaller: big photos decode
        # several times faster and the following antialiased resize gives the same quality.
        draft_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        image.draft("L" if channels == 1 else None, draft_size)
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
    image = _to_mode(image, "L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag, read only for formats that carry EXIF (cheap for the rest)."""
    if image.format not in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") or not (
        "exif" in image.info or image.format == "TIFF"
    ):
        return None
    return image.getexif().get(_EXIF_ORIENTATION)


def _to_mode(image: Image.Image, target: str) -> Image.Image:
    """Convert to "L" or "RGB": 16-bit and float grayscale scaled to 8 bits, transparency put on white."""
    if image.mode.startswith("I"):
        # 16-bit PNG / TIFF: Pillow's convert("L") would clip everything above 255 to white.
        values = np.asarray(image).astype(np.int64)
        image = Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image if image.mode == target else image.convert(target)


class _InlineExecutor(Executor):
    """Run submitted work immediately in this process; used when a pool would cost more than it saves."""

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - delivered through the future like a pool would
            future.set_exception(error)
        return future


@contextlib.contextmanager
def _progress_bar(label: str, total: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on stderr when `enabled`, else a no-op; yields an `advance(n)` callable."""
    if not enabled:
        yield lambda amount: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = progress.add_task(label, total=total)
    with progress:
        yield lambda amount: progress.advance(task, amount)


# ---------------------------------------------------------------------------------------------------------
# Cache: <cache>/imagefolder/<key>/{train,val,test}_{images,labels}.npy + meta.json (written last)


def _cache_key(entries: Sequence[_Entry], image_size: tuple[int, int] | None, channels: int | None) -> str:
    """Hash of everything the decoded arrays depend on: the listing (path, size, mtime) and the request."""
    hasher = hashlib.sha256()
    header = {"version": CACHE_VERSION, "image_size": image_size, "channels": channels, "auto_test": AUTO_TEST_FRACTION}
    hasher.update(json.dumps(header, sort_keys=True).encode())
    for entry in entries:
        hasher.update(f"\n{entry.relpath}\0{entry.size}\0{entry.mtime_ns}\0{entry.split}".encode())
    return hasher.hexdigest()[:24]


def _read_cache(entry_dir: Path) -> FolderData | None:
    """Load a complete cache entry, or None when absent or unreadable (then it is simply rebuilt)."""
    meta_path = entry_dir / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        splits = {
            split: (
                np.load(entry_dir / f"{split}_images.npy", allow_pickle=False),
                np.load(entry_dir / f"{split}_labels.npy", allow_pickle=False),
            )
            for split in meta["splits"]
        }
    except (OSError, ValueError, KeyError):
        return None
    return FolderData(
        classes=list(meta["classes"]),
        splits=splits,
        skipped=list(meta["skipped"]),
        image_size=tuple(meta["image_size"]),
        channels=int(meta["channels"]),
        from_cache=True,
    )


def _write_cache(entry_dir: Path, data: FolderData, *, source: Path, request: tuple) -> None:
    """Write the arrays, then meta.json (whose presence marks the entry complete); drop stale entries.

    A read-only or full cache directory only costs the next run a re-decode, so failure here is a warning.
    """
    try:
        for split, (images, labels) in data.splits.items():
            for name, array in ((f"{split}_images.npy", images), (f"{split}_labels.npy", labels)):
                with atomic_write(entry_dir / name, "wb") as handle:
                    np.save(handle, array, allow_pickle=False)
        meta = {
            "version": CACHE_VERSION,
            "source": str(source),
            "request": _request_json(request),
            "classes": data.classes,
            "splits": {split: len(labels) for split, (_, labels) in data.splits.items()},
            "skipped": data.skipped,
            "image_size": list(data.image_size),
            "channels": data.channels,
        }
        write_text(entry_dir / "meta.json", json.dumps(meta, indent=1))
    except OSError as error:
        warnings.warn(f"could not write the image cache in {entry_dir}: {error}", stacklevel=3)
        return
    _remove_stale_entries(entry_dir, source, request)


def _request_json(request: tuple) -> list:
    """The (image_size, channels) request as JSON-friendly values."""
    image_size, channels = request
    return [list(image_size) if image_size else None, channels]


def _remove_stale_entries(current: Path, source: Path, request: tuple) -> None:
    """Delete older cache entries for the same folder and request: the folder changed, they can never hit again."""
    for other in current.parent.iterdir():
        if other == current or not (other / "meta.json").is_file():
            continue
        try:
            meta = json.loads((other / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("source") == str(source) and meta.get("request") == _request_json(request):
            shutil.rmtree(other, ignore_errors=True)

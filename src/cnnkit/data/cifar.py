"""Read CIFAR-10 and CIFAR-100 from the authors' binary archives, straight out of the tar.gz.

The binary version is fixed-length records (label byte(s) + 3072 pixel bytes, channel-major), so it
needs no pickle (which would run code from a downloaded file) and no extraction to disk: each member
is streamed from the archive once and viewed as a numpy array. Record lengths are checked so a cut
download is reported by member name instead of producing shifted, garbage images.
"""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write

__all__ = ["read_cifar10", "read_cifar100", "write_cifar10_binary"]

_PIXELS = 3 * 32 * 32
Split = tuple[np.ndarray, np.ndarray]  # images uint8 (N, 3, 32, 32), labels int64 (N,)


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps its records and which label byte is the class."""

    variant: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    label_bytes: int
    label_index: int  # CIFAR-100 records are (coarse, fine); the fine label is the class


_CIFAR10 = _Layout(
    variant="CIFAR-10",
    train=tuple(f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)),
    test=("cifar-10-batches-bin/test_batch.bin",),
    label_bytes=1,
    label_index=0,
)
_CIFAR100 = _Layout(
    variant="CIFAR-100",
    train=("cifar-100-binary/train.bin",),
    test=("cifar-100-binary/test.bin",),
    label_bytes=2,
    label_index=1,
)


def read_cifar10(archive: str | os.PathLike[str]) -> tuple[Split, Split]:
    """Return (train, test) from `cifar-10-binary.tar.gz`: uint8 images (N, 3, 32, 32) and int64 labels."""
    return _read_archive(Path(archive), _CIFAR10)


def read_cifar100(archive: str | os.PathLike[str]) -> tuple[Split, Split]:
    """Return (train, test) from `cifar-100-binary.tar.gz` with the 100 fine labels."""
    return _read_archive(Path(archive), _CIFAR100)


def write_cifar10_binary(
    path: str | os.PathLike[str],
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> None:
    """Atomically write a CIFAR-10 binary tar.gz: the train images spread over the five data batches.

    For tests and tooling: it produces the same member names and record layout as the real archive, so a
    small hand-made dataset exercises exactly the reading code a real download does.
    """
    train_records = _records(images, labels)
    if test_images is None or test_labels is None:
        if test_images is not None or test_labels is not None:
            raise ValueError("give test_images and test_labels together, or neither")
        test_images, test_labels = np.zeros((0, 3, 32, 32), np.uint8), np.zeros((0,), np.int64)
    test_records = _records(test_images, test_labels)
    members = {
        name: batch.tobytes() for name, batch in zip(_CIFAR10.train, np.array_split(train_records, 5), strict=True)
    }
    members[_CIFAR10.test[0]] = test_records.tobytes()
    with atomic_write(path, "wb") as handle, tarfile.open(fileobj=handle, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---------------------------------------------------------------------------------------------------------
# Reading


def _read_archive(archive: Path, layout: _Layout) -> tuple[Split, Split]:
    """Stream the archive once, collect the wanted members and turn each split into arrays."""
    members = _read_members(archive, set(layout.train + layout.test))
    missing = [name for name in layout.train + layout.test if name not in members]
    if missing:
        raise CnnkitError(
            f"{archive}: not a {layout.variant} binary archive: missing {', '.join(missing)} "
            "(delete it and download again)"
        )
    train = _decode_split(archive, layout, [(name, members[name]) for name in layout.train])
    test = _decode_split(archive, layout, [(name, members[name]) for name in layout.test])
    return train, test


def _read_members(archive: Path, wanted: set[str]) -> dict[str, bytes]:
    """Read the `wanted` members in one sequential pass (stream mode: the gzip is never re-decompressed)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, mode="r|gz") as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted and member.isfile():
                    handle = tar.extractfile(member)
                    assert handle is not None
                    data = handle.read()
                    if len(data) != member.size:
                        raise CnnkitError(
                            f"{archive}: truncated archive: member {name} has {len(data)} of {member.size} bytes"
                        )
                    found[name] = data
    except FileNotFoundError:
        raise CnnkitError(f"{archive}: file not found") from None
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise CnnkitError(
            f"{archive}: truncated or corrupt archive ({' '.join(str(error).split())}); delete it and download again"
        ) from None
    return found


def _decode_split(archive: Path, layout: _Layout, members: Iterable[tuple[str, bytes]]) -> Split:
    """Concatenate the records of one split's members into images and labels."""
    images, labels = [], []
    record = layout.label_bytes + _PIXELS
    for name, data in members:
        if len(data) % record:
            raise CnnkitError(
                f"{archive}: member {name} has {len(data)} bytes, not a whole number of "
                f"{record}-byte {layout.variant} records (truncated or not a {layout.variant} file)"
            )
        rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, record)
        labels.append(rows[:, layout.label_index].astype(np.int64))
        images.append(rows[:, layout.label_bytes :].reshape(-1, 3, 32, 32))
    # concatenate copies into one fresh C-contiguous, writable array, even for a single member
    return np.concatenate(images), np.concatenate(labels)


# ---------------------------------------------------------------------------------------------------------
# Writing


def _records(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Pack (N, 3, 32, 32) uint8 images and labels 0..255 into (N, 3073) CIFAR-10 records."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"CIFAR images must be uint8 (N, 3, 32, 32), got {images.dtype} {images.shape}")
    if labels.shape != (len(images),) or (labels.size and (labels.min() < 0 or labels.max() > 255)):
        raise ValueError(f"need one label in 0..255 per image, got labels of shape {labels.shape}")
    records = np.empty((len(images), 1 + _PIXELS), np.uint8)
    records[:, 0] = labels
    records[:, 1:] = images.reshape(len(images), _PIXELS)
    return records

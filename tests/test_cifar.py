"""CIFAR binary archives built from real decoded CIFAR-10 JPEGs, read back exactly; damaged archives rejected."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.cifar import read_cifar10, read_cifar100, write_cifar10_binary
from cnnkit.data.registry import get_spec
from cnnkit.data.sources import load_raw
from cnnkit.errors import CnnkitError

CLASSES = get_spec("cifar10").classes
PER_CLASS = 6


@pytest.fixture(scope="module")
def real_images(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    """PER_CLASS decoded test-split JPEGs of every class, as uint8 (N, 3, 32, 32) and labels in registry order."""
    images, labels = [], []
    counts = dict.fromkeys(CLASSES, 0)
    with tarfile.open(shared_data / "cifar10-jpg.tar.gz", "r|gz") as tar:
        for member in tar:
            parts = member.name.split("/")
            if not member.isfile() or parts[1] != "test" or counts[parts[2]] >= PER_CLASS:
                if parts[1:2] == ["train"]:
                    break  # the test split comes first in this archive; no need to stream the rest
                continue
            counts[parts[2]] += 1
            with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                images.append(np.asarray(image.convert("RGB")).transpose(2, 0, 1))
            labels.append(CLASSES.index(parts[2]))
    assert all(count == PER_CLASS for count in counts.values())
    return np.stack(images), np.array(labels, np.int64)


def _tar_gz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_round_trip_real_images(tmp_path: Path, real_images) -> None:
    images, labels = real_images
    archive = tmp_path / "cifar-10-binary.tar.gz"
    write_cifar10_binary(archive, images[:40], labels[:40], images[40:], labels[40:])
    with tarfile.open(archive) as tar:
        names = sorted(tar.getnames())
    expected = [f"cifar-10-batches-bin/data_batch_{i}.bin" for i in range(1, 6)] + [
        "cifar-10-batches-bin/test_batch.bin"
    ]
    assert names == sorted(expected)
    (train_x, train_y), (test_x, test_y) = read_cifar10(archive)
    np.testing.assert_array_equal(train_x, images[:40])
    np.testing.assert_array_equal(train_y, labels[:40])
    np.testing.assert_array_equal(test_x, images[40:])
    np.testing.assert_array_equal(test_y, labels[40:])
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert train_x.flags.c_contiguous and train_x.flags.writeable


def test_load_raw_reads_cifar10_from_data_dir(tmp_path: Path, real_images) -> None:
    images, labels = real_images
    write_cifar10_binary(tmp_path / "cifar10" / "cifar-10-binary.tar.gz", images, labels, images[:5], labels[:5])
    data = load_raw("cifar10", tmp_path, download=False)
    assert data.classes == list(CLASSES)
    assert data.train[0].shape == (len(images), 3, 32, 32) and data.test[0].shape == (5, 3, 32, 32)
    np.testing.assert_array_equal(data.train[0], images)


def test_cifar100_fine_labels(tmp_path: Path, real_images) -> None:
    images, _ = real_images
    count = len(images)
    coarse = np.arange(count) % 20
    fine = (np.arange(count) * 7) % 100

    def records(rows: slice) -> bytes:
        packed = np.concatenate([coarse[rows, None], fine[rows, None], images[rows].reshape(-1, 3072)], axis=1).astype(
            np.uint8
        )
        return packed.tobytes()

    archive = tmp_path / "cifar-100-binary.tar.gz"
    _tar_gz(
        archive,
        {"cifar-100-binary/train.bin": records(slice(0, 50)), "cifar-100-binary/test.bin": records(slice(50, None))},
    )
    (train_x, train_y), (test_x, test_y) = read_cifar100(archive)
    np.testing.assert_array_equal(train_y, fine[:50])
    np.testing.assert_array_equal(test_y, fine[50:])
    np.testing.assert_array_equal(train_x, images[:50])
    np.testing.assert_array_equal(test_x, images[50:])


def test_truncated_member_is_named(tmp_path: Path, real_images) -> None:
    images, labels = real_images
    good = tmp_path / "good.tar.gz"
    write_cifar10_binary(good, images, labels)
    with tarfile.open(good) as tar:
        members = {member.name: tar.extractfile(member).read() for member in tar}
    members["cifar-10-batches-bin/data_batch_3.bin"] = members["cifar-10-batches-bin/data_batch_3.bin"][:-100]
    bad = tmp_path / "cifar-10-binary.tar.gz"
    _tar_gz(bad, members)
    with pytest.raises(CnnkitError) as caught:
        read_cifar10(bad)
    message = str(caught.value)
    assert str(bad) in message and "cifar-10-batches-bin/data_batch_3.bin" in message
    assert "not a whole number of 3073-byte CIFAR-10 records" in message and "\n" not in message


def test_truncated_archive_file(tmp_path: Path, real_images) -> None:
    images, labels = real_images
    archive = tmp_path / "cifar-10-binary.tar.gz"
    write_cifar10_binary(archive, images, labels, images, labels)
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(CnnkitError, match="truncated") as caught:
        read_cifar10(archive)
    assert str(archive) in str(caught.value)


def test_missing_member(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-binary.tar.gz"
    _tar_gz(archive, {"cifar-10-batches-bin/data_batch_1.bin": b""})
    with pytest.raises(CnnkitError, match=r"missing cifar-10-batches-bin/data_batch_2\.bin"):
        read_cifar10(archive)


def test_not_an_archive(tmp_path: Path) -> None:
    archive = tmp_path / "cifar-10-binary.tar.gz"
    archive.write_bytes(b"<html>404</html>")
    with pytest.raises(CnnkitError, match="corrupt archive"):
        read_cifar10(archive)


def test_label_out_of_range_names_archive(tmp_path: Path, real_images) -> None:
    images, labels = real_images
    labels = labels.copy()
    labels[3] = 12
    archive = tmp_path / "cifar10" / "cifar-10-binary.tar.gz"
    write_cifar10_binary(archive, images, labels, images, labels)
    with pytest.raises(CnnkitError, match=r"label\(s\) outside 0\.\.9") as caught:
        load_raw("cifar10", tmp_path, download=False)
    assert str(archive) in str(caught.value)

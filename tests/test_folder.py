"""Image folders built from real CIFAR-10 JPEGs: layouts, labels, the decoded cache, messy files, auto split."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnkit.data.folder import load_image_folder
from cnnkit.data.images import decode_image
from cnnkit.data.sources import load_raw
from cnnkit.errors import CnnkitError
from slices import extract_cifar_subset

SUBSET_CLASSES = ("airplane", "automobile", "bird", "cat")
PER_CLASS = {"train": 30, "test": 10}


@pytest.fixture(scope="module")
def cifar_subset(shared_data: Path, tmp_path_factory) -> Path:
    """train/ and test/ folders of 4 classes extracted from the real cifar10-jpg archive."""
    return extract_cifar_subset(shared_data / "cifar10-jpg.tar.gz", tmp_path_factory.mktemp("cifar-subset"),
                                SUBSET_CLASSES, PER_CLASS)


def _decode_sorted(folder: Path) -> np.ndarray:
    """Decode a class folder's JPEGs in name order, independently of the code under test."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")).transpose(2, 0, 1) for p in sorted(folder.iterdir())])


def _flat_copy(source: Path, target: Path, classes=SUBSET_CLASSES, limit: int | None = None) -> Path:
    for name in classes:
        (target / name).mkdir(parents=True)
        for path in sorted((source / name).iterdir())[:limit]:
            shutil.copyfile(path, target / name / path.name)
    return target


def _row_set(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


# ---------------------------------------------------------------------------------------------------------
# Layouts and labels


def test_split_layout_shapes_classes_and_labels(cifar_subset: Path, tmp_path: Path) -> None:
    data = load_image_folder(cifar_subset, tmp_path)
    assert data.classes == sorted(SUBSET_CLASSES)
    assert set(data.splits) == {"train", "test"}
    train_x, train_y = data.splits["train"]
    test_x, test_y = data.splits["test"]
    assert train_x.shape == (120, 3, 32, 32) and test_x.shape == (40, 3, 32, 32)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64 and train_x.flags.c_contiguous
    assert (data.image_size, data.channels, data.skipped) == ((32, 32), 3, [])
    for index, name in enumerate(data.classes):
        np.testing.assert_array_equal(train_x[train_y == index], _decode_sorted(cifar_subset / "train" / name))
        np.testing.assert_array_equal(test_x[test_y == index], _decode_sorted(cifar_subset / "test" / name))


def test_load_raw_imagefolder(cifar_subset: Path, tmp_path: Path) -> None:
    data = load_raw(f"imagefolder:{cifar_subset}", tmp_path, progress=False)
    assert data.name == f"imagefolder:{cifar_subset.resolve()}"
    assert data.train[0].shape == (120, 3, 32, 32) and data.test is not None and data.val is None
    assert len(list((tmp_path / "imagefolder").iterdir())) == 1


def test_split_name_aliases_and_val(cifar_subset: Path, tmp_path: Path) -> None:
    root = tmp_path / "aliased"
    shutil.copytree(cifar_subset / "train", root / "Training")
    shutil.copytree(cifar_subset / "test", root / "validation")
    data = load_raw(f"imagefolder:{root}", tmp_path / "cache", progress=False)
    assert data.test is None and data.val is not None and data.val[0].shape == (40, 3, 32, 32)


def test_parallel_decode_matches_serial(cifar_subset: Path) -> None:
    serial = load_image_folder(cifar_subset, None, workers=1)
    parallel = load_image_folder(cifar_subset, None, workers=2)
    for split in serial.splits:
        np.testing.assert_array_equal(serial.splits[split][0], parallel.splits[split][0])
        np.testing.assert_array_equal(serial.splits[split][1], parallel.splits[split][1])


# ---------------------------------------------------------------------------------------------------------
# The decoded cache


def test_second_load_uses_cache(cifar_subset: Path, tmp_path: Path) -> None:
    first = load_image_folder(cifar_subset, tmp_path)
    (entry,) = (tmp_path / "imagefolder").iterdir()
    stamps = {path.name: path.stat().st_mtime_ns for path in entry.iterdir()}
    second = load_image_folder(cifar_subset, tmp_path)
    assert not first.from_cache and second.from_cache
    assert {path.name: path.stat().st_mtime_ns for path in entry.iterdir()} == stamps
    assert sorted(stamps) == ["meta.json", "test_images.npy", "test_labels.npy", "train_images.npy", "train_labels.npy"]
    assert second.classes == first.classes and second.image_size == (32, 32) and second.channels == 3
    np.testing.assert_array_equal(second.splits["train"][0], first.splits["train"][0])
    np.testing.assert_array_equal(second.splits["test"][1], first.splits["test"][1])


@pytest.mark.parametrize("on_disk", [False, True])
def test_a_cache_entry_holding_vectors_instead_of_images_is_decoded_again(cifar_subset: Path, tmp_path: Path,
                                                                         on_disk: bool) -> None:
    """The files that stream from disk may also be a frozen backbone's float32 vectors (data/disk.py): an image
    cache entry whose images file was replaced by such a file, rows for rows, is not taken for images."""
    first = load_image_folder(cifar_subset, tmp_path)
    (entry,) = (tmp_path / "imagefolder").iterdir()
    np.save(entry / "train_images.npy", np.zeros((120, 8), np.float32))
    again = load_image_folder(cifar_subset, tmp_path, on_disk=on_disk)
    assert not again.from_cache
    images = again.splits["train"][0]
    assert images.shape == (120, 3, 32, 32)
    np.testing.assert_array_equal(images.load() if on_disk else images, first.splits["train"][0])


def test_changed_folder_is_decoded_again_and_stale_cache_dropped(cifar_subset: Path, tmp_path: Path) -> None:
    root = tmp_path / "folder"
    shutil.copytree(cifar_subset, root)
    cache = tmp_path / "cache"
    load_image_folder(root, cache)
    (old_entry,) = (cache / "imagefolder").iterdir()
    extra = sorted((root / "train" / "cat").iterdir())[0]
    shutil.copyfile(extra, extra.with_name("extra.jpg"))
    changed = load_image_folder(root, cache)
    assert not changed.from_cache and len(changed.splits["train"][1]) == 121
    (new_entry,) = (cache / "imagefolder").iterdir()
    assert new_entry != old_entry
    # a different request keeps its own entry beside it
    small = load_image_folder(root, cache, image_size=(16, 16))
    assert small.splits["train"][0].shape == (121, 3, 16, 16)
    assert len(list((cache / "imagefolder").iterdir())) == 2


def test_read_only_cache_dir_still_loads(cifar_subset: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should go")
    with pytest.warns(UserWarning, match="could not write the image cache"):
        data = load_image_folder(cifar_subset, blocker)
    assert data.splits["train"][0].shape == (120, 3, 32, 32)


# ---------------------------------------------------------------------------------------------------------
# Messy folders


def test_corrupt_hidden_and_uppercase_files(cifar_subset: Path, tmp_path: Path) -> None:
    root = _flat_copy(cifar_subset / "train", tmp_path / "messy", classes=("airplane", "bird"), limit=12)
    real = sorted((root / "bird").iterdir())[0].read_bytes()
    (root / "bird" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (root / "bird" / "half.jpg").write_bytes(real[: len(real) // 2])
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "bird" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "airplane" / "notes.txt").write_text("not an image")
    first_plane = sorted((root / "airplane").iterdir())[0]
    Image.open(first_plane).save(root / "airplane" / "UPPER.PNG")
    for hidden in (root / ".ipynb_checkpoints", root / "__MACOSX" / "airplane", root / "airplane" / ".thumbs"):
        hidden.mkdir(parents=True)
        shutil.copyfile(first_plane, hidden / "copy.jpg")

    data = load_raw(f"imagefolder:{root}", tmp_path / "cache", progress=False)
    assert data.classes == ["airplane", "bird"]
    assert [str(item) for item in data.skipped] == ["bird/broken.jpg", "bird/half.jpg"]
    assert data.test is not None
    counts = np.bincount(data.train[1], minlength=2) + np.bincount(data.test[1], minlength=2)
    assert counts.tolist() == [13, 12]  # 12 + UPPER.PNG; 14 bird files minus the two unreadable ones
    again = load_raw(f"imagefolder:{root}", tmp_path / "cache", progress=False)
    assert again.skipped == data.skipped  # the cache remembers what was skipped


def test_grayscale_sizes_and_16_bit(tmp_path: Path) -> None:
    root = tmp_path / "gray"
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 24), dtype=np.uint8), "L").save(root / name / f"{index}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(root / "a" / "big.png")
    Image.fromarray(np.full((20, 24), 65535, np.uint16)).save(root / "b" / "deep.png")  # 16-bit grayscale
    Image.fromarray(np.zeros((20, 24), np.uint8), "L").convert("1").save(root / "b" / "bilevel.bmp")

    data = load_image_folder(root, None)
    images = np.concatenate([data.splits["train"][0], data.splits["test"][0]])
    assert data.channels == 1 and data.image_size == (20, 24)
    assert images.shape == (11, 1, 20, 24)  # 4 + 4 + big + deep + bilevel, the big one resized
    rows = {image.tobytes() for image in images}
    assert np.full((1, 20, 24), 255, np.uint8).tobytes() in rows  # 16-bit white stays white, not clipped
    assert np.zeros((1, 20, 24), np.uint8).tobytes() in rows

    forced = load_image_folder(root, None, image_size=(16, 12), channels=3)
    assert forced.splits["train"][0].shape[1:] == (3, 16, 12) and forced.channels == 3


def test_inferred_target_is_checked_against_every_image(tmp_path: Path) -> None:
    """The size/channel guess comes from a sample; one colour image the sample missed still makes it RGB."""
    root = tmp_path / "mostly-gray"
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for index in range(300):
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").save(root / name / f"{index:03d}.png")
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "RGB").save(root / "b" / "151.png")
    inferred = load_image_folder(root, None)
    explicit = load_image_folder(root, None, image_size=(8, 8), channels=3)
    assert inferred.channels == 3 and inferred.image_size == (8, 8)
    for split in explicit.splits:
        np.testing.assert_array_equal(inferred.splits[split][0], explicit.splits[split][0])


def test_transparency_goes_on_white(tmp_path: Path) -> None:
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    array = decode_image(clear, (8, 8), 3)
    assert array.shape == (3, 8, 8) and (array == 255).all()
    half = decode_image(Image.new("LA", (8, 8), (0, 128)), (4, 4), 1)
    assert half.shape == (1, 4, 4) and 120 <= int(half.mean()) <= 135


# ---------------------------------------------------------------------------------------------------------
# Automatic test split of a flat folder


def test_flat_folder_auto_split_is_deterministic_and_disjoint(cifar_subset: Path, tmp_path: Path) -> None:
    root = _flat_copy(cifar_subset / "train", tmp_path / "flat")
    first = load_image_folder(root, None)
    second = load_image_folder(root, None)
    train_x, train_y = first.splits["train"]
    test_x, test_y = first.splits["test"]
    assert np.bincount(test_y).tolist() == [3, 3, 3, 3] and np.bincount(train_y).tolist() == [27, 27, 27, 27]
    assert not _row_set(train_x) & _row_set(test_x)
    np.testing.assert_array_equal(test_x, second.splits["test"][0])
    np.testing.assert_array_equal(train_x, second.splits["train"][0])

    # removing a training image leaves the test split untouched (the split hangs on each file's own path)
    train_rows = _row_set(train_x)
    victim = next(p for p in sorted((root / "cat").iterdir()) if decode_image(p, (32, 32), 3).tobytes() in train_rows)
    victim.unlink()
    after = load_image_folder(root, None)
    np.testing.assert_array_equal(after.splits["test"][0], test_x)


# ---------------------------------------------------------------------------------------------------------
# Folders that cannot be a dataset


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "readme.txt").write_text("no images here")
    with pytest.raises(CnnkitError, match="no images found") as caught:
        load_raw(f"imagefolder:{tmp_path / 'empty'}", tmp_path / "cache")
    assert str(tmp_path / "empty") in str(caught.value) and "\n" not in str(caught.value)


def test_single_class_folder(cifar_subset: Path, tmp_path: Path) -> None:
    root = _flat_copy(cifar_subset / "train", tmp_path / "one", classes=("cat",), limit=3)
    with pytest.raises(CnnkitError, match=r"only one class folder with images \('cat'\)") as caught:
        load_image_folder(root, None)
    assert str(root) in str(caught.value)


def test_test_class_missing_from_train(cifar_subset: Path, tmp_path: Path) -> None:
    root = tmp_path / "split"
    _flat_copy(cifar_subset / "train", root / "train", classes=("airplane", "bird"), limit=3)
    _flat_copy(cifar_subset / "test", root / "test", classes=("airplane", "cat"), limit=3)
    with pytest.raises(CnnkitError, match=r"class folder\(s\) cat have no images in train/"):
        load_image_folder(root, None)


def test_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(CnnkitError, match="not a folder"):
        load_raw(f"imagefolder:{tmp_path / 'missing'}", tmp_path)


def test_decode_image_from_bytes_file(cifar_subset: Path) -> None:
    path = sorted((cifar_subset / "test" / "cat").iterdir())[0]
    from_path = decode_image(path, (32, 32), 3)
    from_file = decode_image(io.BytesIO(path.read_bytes()), (32, 32), 3)
    np.testing.assert_array_equal(from_path, from_file)
    assert decode_image(path, (64, 48), 1).shape == (1, 64, 48)


def test_exif_rotation_and_jpeg_draft(tmp_path: Path) -> None:
    """A phone photo stored sideways with an EXIF orientation tag is decoded upright, and big JPEGs
    decoded at reduced scale (draft) match a full decode + resize closely."""
    gradient = np.tile(np.linspace(0, 255, 400, dtype=np.uint8), (300, 1))
    photo = Image.fromarray(np.stack([gradient, gradient[:, ::-1], np.full_like(gradient, 90)], axis=2))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    photo.save(tmp_path / "sideways.jpg", quality=95, exif=exif)
    upright = decode_image(tmp_path / "sideways.jpg", (40, 30), 3)
    assert upright.shape == (3, 40, 30)
    reference = np.asarray(photo.transpose(Image.Transpose.ROTATE_270).resize((30, 40), Image.Resampling.BILINEAR))
    assert np.abs(upright.astype(int) - reference.transpose(2, 0, 1)).mean() < 4

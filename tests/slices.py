"""Small slices of the real datasets in ../shared/data, shared by the test modules (and the benchmarks)."""

from __future__ import annotations

import argparse
import functools
import tarfile
from pathlib import Path

from cnnkit.data.registry import get_spec

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: The class folders of cifar10-jpg.tar.gz: CIFAR-10's class names, as cnnkit's registry has them.
CIFAR_CLASSES: tuple[str, ...] = get_spec("cifar10").classes


@functools.cache
def mnist_dataset(limit_train: int = 4000, limit_eval: int = 1000):
    """A cnnkit Dataset of real MNIST images: `limit_train` training images, `limit_eval` val and test."""
    from cnnkit.data.tensors import load_dataset

    return load_dataset("mnist", str(SHARED_DATA), limit_train=limit_train, limit_eval=limit_eval, progress=False)


def add_cifar_archive_option(parser: argparse.ArgumentParser) -> None:
    """--cifar-jpg for a benchmark that extracts CIFAR subsets: a missing archive (from a git worktree, ../shared
    is not beside it) is argparse's one-line error, not a traceback once the benchmark has started."""

    def existing(text: str) -> Path:
        if not Path(text).is_file():
            raise argparse.ArgumentTypeError(f"{text} not found; pass the path of cifar10-jpg.tar.gz")
        return Path(text)

    parser.add_argument("--cifar-jpg", type=existing, default=str(SHARED_DATA / "cifar10-jpg.tar.gz"))


def extract_cifar_subset(archive: Path, root: Path, classes: tuple[str, ...], per_split: dict[str, int]) -> Path:
    """Copy the first `per_split[split]` JPEGs of each class out of the real cifar10-jpg archive.

    Gives `root/<split>/<class>/*.jpg`; the archive is streamed once and left as soon as all is found.
    """
    counts = {(split, name): 0 for split in per_split for name in classes}
    with tarfile.open(archive, "r|gz") as tar:
        for member in tar:
            parts = [*member.name.split("/"), "", ""]  # cifar10-jpg/<split>/<class>/<file>
            if not member.isfile() or (parts[1], parts[2]) not in counts:
                if parts[1:2] == ["train"] and parts[2] > max(classes):
                    break  # members are sorted: everything we need has been seen
                continue
            if counts[parts[1], parts[2]] < per_split[parts[1]]:
                counts[parts[1], parts[2]] += 1
                target = root / parts[1] / parts[2] / parts[3]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    assert all(counts[key] == per_split[key[0]] for key in counts), counts
    return root


@functools.cache
def mnist_arrays(split: str):
    """(images (N, 28, 28) uint8, labels (N,) int64) of the real MNIST `split`: "train" or "t10k"."""
    from cnnkit.data.idx import read_idx

    images = read_idx(SHARED_DATA / "mnist" / f"{split}-images-idx3-ubyte.gz", ndim=3)
    labels = read_idx(SHARED_DATA / "mnist" / f"{split}-labels-idx1-ubyte.gz", ndim=1)
    return images, labels.astype("int64")


def write_mnist_folder(root: Path, train_per_class: dict[int, int], test_per_class: int | None = None,
                       flip: float = 0.0, seed: int = 0) -> Path:
    """An image folder of real MNIST PNGs: `root/train/<digit>/` with the first `train_per_class[d]` training
    images of each digit, `root/test/<digit>/` with the first `test_per_class` test images of those digits (all
    of them when None; no test/ when 0). `flip`: that share of the training images, drawn at random, is put in another digit's folder
    (uniformly among the other nine); their names start with "flipped-" so a test can tell them apart."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, labels = mnist_arrays("train")
    chosen = np.concatenate([np.flatnonzero(labels == digit)[:count] for digit, count in train_per_class.items()])
    flipped = set(rng.choice(chosen, size=round(flip * len(chosen)), replace=False).tolist()) if flip else set()
    for index in chosen.tolist():
        given = int(labels[index])
        name = f"{index:05d}.png"
        if index in flipped:
            given = int(rng.choice([digit for digit in range(10) if digit != given]))
            name = f"flipped-{index:05d}.png"
        folder = root / "train" / str(given)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(folder / name)
    test_images, test_labels = mnist_arrays("t10k")
    for digit in (train_per_class if test_per_class != 0 else ()):
        folder = root / "test" / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        for index in np.flatnonzero(test_labels == digit)[:test_per_class].tolist():
            Image.fromarray(test_images[index]).save(folder / f"{index:05d}.png")
    return root

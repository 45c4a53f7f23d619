"""Small slices of the real datasets in ../shared/data, shared by the test modules."""

from __future__ import annotations

import functools
import tarfile
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@functools.cache
def mnist_dataset(limit_train: int = 4000, limit_eval: int = 1000):
    """A cnnkit Dataset of real MNIST images: `limit_train` training images, `limit_eval` val and test."""
    from cnnkit.data.tensors import load_dataset

    return load_dataset("mnist", str(SHARED_DATA), limit_train=limit_train, limit_eval=limit_eval, progress=False)


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

"""The built-in datasets: where each file lives, how to check it, and what its classes are called.

Adding a dataset is one entry in DATASETS. Checksums are facts about the published files, so they live
here next to the URLs instead of in the downloader. Each file carries two ways to prove it is the right
one: the md5 of the canonical archive (as published by the authors and used by torchvision) and, where
known, the sha256 of the decompressed payload, which survives re-compression by a mirror.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cnnkit.errors import CnnkitError

__all__ = ["DATASETS", "IMAGEFOLDER_PREFIX", "DatasetSpec", "FileSpec", "get_spec", "image_folder", "mirror_ok"]

#: `--dataset imagefolder:PATH`: a folder of the user's own images instead of a registered dataset.
IMAGEFOLDER_PREFIX = "imagefolder:"


def image_folder(name: str) -> str | None:
    """The PATH of a dataset name `imagefolder:PATH` (possibly empty), or None for any other name: the one place
    that knows how an image folder is spelled."""
    return name[len(IMAGEFOLDER_PREFIX):] if name.startswith(IMAGEFOLDER_PREFIX) else None

DatasetKind = Literal["idx", "cifar10", "cifar100"]


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset: its name on disk, where to get it, and the checksums that accept it."""

    filename: str
    urls: tuple[str, ...]  # canonical mirrors, tried in order
    md5: str | None  # md5 of the file exactly as the canonical mirrors serve it
    content_sha256: str | None = None  # sha256 of the gunzipped payload; accepts re-gzipped copies
    size: int | None = None  # bytes of the canonical file: a download is capped near it (see download.size_cap)


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: which reader it needs, its files by role, its class names and image shape."""

    name: str
    kind: DatasetKind
    files: dict[str, FileSpec]  # roles: train_images, train_labels, test_images, test_labels, or archive
    classes: tuple[str, ...]
    shape: tuple[int, int, int]  # (C, H, W)
    description: str
    # Whether a left-right mirror image is still an image of its class: true for photos and clothing, false
    # for digits and characters (a mirrored 2 or "ki" is no 2 or "ki"). `flip=auto` trains with mirroring
    # only where it is true, and flip test-time augmentation is refused where it is not.
    mirror_ok: bool = False


def get_spec(name: str) -> DatasetSpec:
    """Return the spec registered as `name` (case-insensitive), or say which names exist."""
    spec = DATASETS.get(name.strip().lower())
    if spec is None:
        known = ", ".join(DATASETS)
        raise CnnkitError(f"unknown dataset {name!r}; known datasets: {known}, or imagefolder:PATH for your own images")
    return spec


# ---------------------------------------------------------------------------------------------------------
# IDX datasets (MNIST family): four gzipped IDX files under one base URL

_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def _idx_files(
    base_urls: tuple[str, ...], md5s: dict[str, str], sha256s: dict[str, str] | None = None,
    sizes: dict[str, int] | None = None,
) -> dict[str, FileSpec]:
    """Build the four FileSpecs of an MNIST-style dataset served from `base_urls`."""
    return {
        role: FileSpec(
            filename=filename,
            urls=tuple(base + filename for base in base_urls),
            md5=md5s[role],
            content_sha256=(sha256s or {}).get(role),
            size=(sizes or {}).get(role),
        )
        for role, filename in _IDX_FILES.items()
    }


_MNIST = DatasetSpec(
    name="mnist",
    kind="idx",
    files=_idx_files(
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "https://yann.lecun.com/exdb/mnist/"),
        md5s={
            "train_images": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train_labels": "d53e105ee54ea40749a09fcbcd1e9432",
            "test_images": "9fb629c4189551a2d022fa330f9573f3",
            "test_labels": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        sha256s={
            "train_images": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train_labels": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "test_images": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "test_labels": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        sizes={"train_images": 9912422, "train_labels": 28881, "test_images": 1648877, "test_labels": 4542},
    ),
    classes=tuple(str(digit) for digit in range(10)),
    shape=(1, 28, 28),
    description="handwritten digits 0-9, 60k train / 10k test, 28x28 grayscale",
    mirror_ok=False,
)

_FASHION_MNIST = DatasetSpec(
    name="fashion-mnist",
    kind="idx",
    files=_idx_files(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5s={
            "train_images": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train_labels": "25c81989df183df01b3e8a0aad5dffbe",
            "test_images": "bef4ecab320f06d8554ea6380940ec79",
            "test_labels": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        sha256s={
            "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        sizes={"train_images": 26421880, "train_labels": 29515, "test_images": 4422102, "test_labels": 5148},
    ),
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    shape=(1, 28, 28),
    description="Zalando clothing photos in 10 classes, 60k train / 10k test, 28x28 grayscale",
    mirror_ok=True,
)

_KMNIST = DatasetSpec(
    name="kmnist",
    kind="idx",
    files=_idx_files(
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        md5s={
            "train_images": "bdb82020997e1d708af4cf47b453dcf7",
            "train_labels": "e144d726b3acfaa3e44228e80efcd344",
            "test_images": "5c965bf0a639b31b8f53240b1b52f4d7",
            "test_labels": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        sizes={"train_images": 18165135, "train_labels": 29497, "test_images": 3041136, "test_labels": 5120},
    ),
    classes=("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
    shape=(1, 28, 28),
    description="Kuzushiji (cursive Japanese) characters in 10 classes, 60k train / 10k test, 28x28 grayscale",
    mirror_ok=False,
)

# ---------------------------------------------------------------------------------------------------------
# CIFAR: one tar.gz of fixed-length binary records (the "binary version", never the pickled one)

_CIFAR10 = DatasetSpec(
    name="cifar10",
    kind="cifar10",
    files={
        "archive": FileSpec(
            filename="cifar-10-binary.tar.gz",
            urls=("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",),
            md5="c32a1d4ab5d03f1284b67883e8d87530",
            size=170052171,
        )
    },
    classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    shape=(3, 32, 32),
    description="small colour photos in 10 classes, 50k train / 10k test, 32x32 RGB",
    mirror_ok=True,
)

# The 100 fine labels in label-index order (fine_label_names.txt of the archive).
_CIFAR100_FINE_LABELS = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

_CIFAR100 = DatasetSpec(
    name="cifar100",
    kind="cifar100",
    files={
        "archive": FileSpec(
            filename="cifar-100-binary.tar.gz",
            urls=("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",),
            md5="03b5dce01913d631647c71ecec9e9cb8",
            size=168513733,
        )
    },
    classes=_CIFAR100_FINE_LABELS,
    shape=(3, 32, 32),
    description="small colour photos in 100 fine classes, 50k train / 10k test, 32x32 RGB",
    mirror_ok=True,
)

DATASETS: dict[str, DatasetSpec] = {spec.name: spec for spec in (_MNIST, _FASHION_MNIST, _KMNIST, _CIFAR10, _CIFAR100)}


def mirror_ok(name: str, channels: int) -> bool:
    """Whether mirrored images of dataset `name` keep their class (see DatasetSpec.mirror_ok).

    An image folder (`imagefolder:PATH`) is taken as mirror-safe when it is in colour: grayscale folders
    are most often digits or characters, colour ones photos. A name that is neither is not mirrored.
    """
    spec = DATASETS.get(name.strip().lower())
    if spec is not None:
        return spec.mirror_ok
    return image_folder(name) is not None and channels == 3

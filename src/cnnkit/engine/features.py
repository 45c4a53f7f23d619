"""A frozen backbone's features: computed once per image, kept on disk, and what the head then trains on.

With `--freeze backbone` only the head learns, so the backbone maps an image to the same vector in every epoch.
Computing the vectors once turns each epoch's backbone passes into one small matrix product, and keeping them
on disk (DATA_DIR/features/KEY.npy, float32 (N, D)) lets a later run on the same data, with other head options,
skip the backbone altogether. Vectors of images that stream from disk (`--stream`) stream too: written a block
at a time and read back in shuffled chunks as the images would have been (data/disk.py), so a folder too large
for memory is not made to fit by its features (5 KB an image for EfficientNet-Lite's 1,280 floats: more than a
32x32 photo's decoded 3 KB). A vector is decided by the image's pixels and by the network before its head (its
architecture and options, every weight, BatchNorm statistic and normalisation constant), so the key hashes
exactly those: anything that could change a vector changes the key, and nothing else does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnkit.data.cache import npy_header
from cnnkit.data.disk import DiskImages
from cnnkit.data.tensors import Dataset, Split
from cnnkit.engine.checkpoint import data_fingerprint
from cnnkit.engine.inference import predict_logits
from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_path, sweep_stale_temp_files
from cnnkit.models.classifier import ImageClassifier
from cnnkit import __version__
from cnnkit.data.download import data_root
from cnnkit.models.pretrained import pretrained_names

#: Part of every key: a change in how cnnkit computes features retires the old files.
FORMAT = "cnnkit.features/1"
#: Model options that act only while training (stochastic depth). Vectors are computed in eval mode, where they
#: change nothing, so they stay out of the key: a fine-tuning's probe reads what transfer-fast's run cached.
TRAINING_ONLY_KWARGS = frozenset({"drop_path_rate"})
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FeatureSummary:
    """What the feature step did, for the log and metrics.json."""

    cached_images: int  # read from the cache
    computed_images: int  # passed through the backbone
    fit_images: int  # of those, train + validation: their backbone pass is part of training's cost
    seconds: float  # computing (and writing) the vectors
    fit_seconds: float  # the share spent on train + validation images
    folder: str

    def describe(self, step: str = "frozen backbone") -> str:
        total = self.cached_images + self.computed_images
        if not self.computed_images:
            return (f"{step}: the features of all {total:,} images came from the cache ({self.folder}): "
                    "no backbone pass")
        cached = f"; {self.cached_images:,} came from the cache" if self.cached_images else ""
        return (f"{step}: features of {self.computed_images:,} images computed in {self.seconds:.1f} s"
                f"{cached} (kept in {self.folder}: a later run on the same images skips the backbone)")

    def to_dict(self) -> dict[str, float | int | str]:
        return {"cached_images": self.cached_images, "computed_images": self.computed_images,
                "seconds": round(self.seconds, 3), "folder": self.folder}


class PooledFeatures(nn.Module):
    """The classifier up to its pooled feature vector: the model's own rescaling, then its backbone."""

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        body = self.model.body
        images = images.contiguous(memory_format=torch.channels_last)  # as fit() trains: faster convolutions on CPU
        return body.forward_head(body.forward_features(self.model.rescale(images)), pre_logits=True)


@dataclass(frozen=True)
class FeatureUse:
    """What asks for a backbone's pooled features, named in a refusal together with the way around it."""

    option: str
    instead: str  # what to do when the model has no separate head


FROZEN_BACKBONE = FeatureUse("--freeze backbone", "train it whole")
LINEAR_PROBE = FeatureUse("--probe-epochs", "add --probe-epochs 0")


def check_frozen_backbone(model: nn.Module, use: FeatureUse = FROZEN_BACKBONE) -> None:
    """Refuse a model whose backbone does not say where its features end and its head begins."""
    body = getattr(model, "body", None)
    if not isinstance(model, ImageClassifier) or not all(
            callable(getattr(body, name, None)) for name in ("forward_features", "forward_head", "head_module")):
        name = getattr(model, "architecture", None) or type(model).__name__
        raise CnnkitError(f"{use.option} needs a backbone with pooled features and a separate head "
                          f"({', '.join(pretrained_names())}); {name} has none: {use.instead}, or freeze its "
                          "backbone for the first epochs only (--freeze-epochs N)")


def backbone_key(model: ImageClassifier, head: nn.Module) -> str:
    """SHA-256 of everything in `model` that decides a feature vector: the architecture and its options (but
    training-only ones), and every tensor of its state but the head's."""

    digest = hashlib.sha256()
    kwargs = {name: value for name, value in model.model_kwargs.items() if name not in TRAINING_ONLY_KWARGS}
    described = [FORMAT, __version__, model.architecture, kwargs, list(model.input_shape or ())]
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    head_tensors = {id(tensor) for tensor in [*head.parameters(), *head.buffers()]}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in head_tensors:
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def features_folder(data_dir: str | None) -> Path:
    return data_root(data_dir) / "features"


def frozen_features(model: ImageClassifier, data: Dataset, *, device: torch.device, batch_size: int,
                    folder: Path, log=print, splits: tuple[str, ...] = SPLITS,
                    use: FeatureUse = FROZEN_BACKBONE) -> tuple[nn.Module, Dataset, FeatureSummary]:
    """The head of `model` (sharing its parameters) and `data` as the backbone's pooled feature vectors.

    Each of `splits` has its vectors read from `folder` when a file of their key is there, else computed in
    fp32 on `device` and written there; a split left out is empty (a probe before fine-tuning never scores the
    test set on features); a split whose images are on disk gets its vectors on disk (DiskImages). Training the
    returned head trains `model`'s own head, so the run saves `model` whole, and predict, export and serve see
    an ordinary network. `use` is what asked, for its error.
    """
    check_frozen_backbone(model, use)
    swept = sweep_stale_temp_files(folder)  # a streamed split's file is written for the whole backbone pass
    if swept:
        log(f"frozen backbone: removed {len(swept)} half-written feature file(s) a stopped run left in {folder}")
    outdated = remove_outdated(folder)
    if outdated:
        log(f"frozen backbone: removed {len(outdated)} feature file(s) of an earlier cnnkit ({OUTDATED_SUFFIX}, "
            f"no longer read) from {folder}")
    model.to(device)
    head = model.body.head_module()
    key = backbone_key(model, head)
    pooled = PooledFeatures(model)
    width = model.body.num_features
    vectors_of = {name: Split(torch.empty((0, width)), torch.empty(0, dtype=torch.int64)) for name in SPLITS}
    cached, computed, fit_images, seconds, fit_seconds = 0, 0, 0, 0.0, 0.0
    for name in splits:
        split: Split = getattr(data, name)
        path = folder / f"{split_key(key, split)}.npy"
        vectors = read_cached(path, len(split), width, on_disk=split.on_disk)
        if vectors is None:
            started = time.perf_counter()
            vectors = compute(pooled, split, batch_size, width, path, log)
            spent = time.perf_counter() - started
            computed, seconds = computed + len(split), seconds + spent
            if name != "test":
                fit_images, fit_seconds = fit_images + len(split), fit_seconds + spent
        else:
            cached += len(split)
        vectors_of[name] = Split(vectors.to(device), split.labels.to(device))
    features = Dataset(data.name, data.classes, vectors_of["train"], vectors_of["val"], vectors_of["test"],
                       val_source=data.val_source, skipped=data.skipped)
    return head, features, FeatureSummary(cached, computed, fit_images, seconds, fit_seconds, str(folder))


#: Feature files of cnnkit before 2026-12-06 (safetensors; now .npy, which a streamed split can be read from a
#: chunk at a time): nothing reads them, so they only hold disk space.
OUTDATED_SUFFIX = ".safetensors"


def remove_outdated(folder: Path) -> list[Path]:
    """Remove the feature files of the format cnnkit no longer reads from its own cache folder; return them."""
    removed = []
    for path in folder.glob(f"*{OUTDATED_SUFFIX}"):  # nothing for a folder missing or unreadable
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(OSError):  # a read-only cache: they stay, and nothing reads them
                path.unlink()
                removed.append(path)
    return removed


def split_key(backbone: str, split: Split) -> str:
    """The file name of a split's vectors: the backbone's key and the split's pixels (labels play no part)."""
    return hashlib.sha256(f"{backbone}:{data_fingerprint(split.images)}".encode()).hexdigest()[:40]


def compute(pooled: PooledFeatures, split: Split, batch_size: int, width: int, path: Path,
            log) -> torch.Tensor | DiskImages:
    """The pooled vectors of every image of `split`, float32 (N, width), kept at `path`: in memory (on the CPU) when
    the images are, and then a cache that cannot be written costs only the next run's time; on disk when the
    images stream from there, written a block at a time (a cache that cannot be written is then a refusal)."""
    if not len(split):
        return torch.empty((0, width))
    if not split.on_disk:
        vectors = predict_logits(pooled, split.images, batch_size=batch_size).float().cpu().contiguous()
        keep(path, vectors, log)
        return vectors
    write_streamed(pooled, split.images, batch_size, width, path)
    return DiskImages.open(path)


def write_streamed(pooled: PooledFeatures, images: DiskImages, batch_size: int, width: int, path: Path) -> None:
    """The vectors of `images` into the .npy file `path` (atomically), read and computed a chunk of images at a
    time; chunks of whole batches, so each vector comes from the same batch as in memory and matches it bit for
    bit."""
    step = batch_size * max(1, images.chunk_rows // batch_size)
    with atomic_path(path) as tmp, open(tmp, "wb") as out:
        out.write(npy_header((len(images), width), dtype=np.float32))
        for start in range(0, len(images), step):
            block = predict_logits(pooled, images[start : start + step], batch_size=batch_size)
            out.write(block.float().cpu().contiguous().numpy().tobytes())


def read_cached(path: Path, count: int, width: int, *, on_disk: bool = False) -> torch.Tensor | DiskImages | None:
    """The vectors kept at `path` when they are there and of the expected shape, read into memory or, `on_disk`,
    left there; else None (computed anew and the file replaced). Only the .npy header is parsed: nothing in
    the file can run code."""
    if not path.is_file():
        return None
    try:
        stored = DiskImages.open(path)
    except (OSError, ValueError, SyntaxError):
        return None  # a damaged or foreign file
    if stored.dtype != torch.float32 or tuple(stored.shape) != (count, width):
        return None
    if on_disk and count:
        return stored
    try:
        return torch.from_numpy(stored.load())
    except OSError:
        return None  # shorter than its header says: cut off by a full disk


def keep(path: Path, vectors: torch.Tensor, log) -> None:
    """Write `vectors` to the cache (atomically); a cache that cannot be written costs only the next run's time."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            np.save(out, vectors.numpy(), allow_pickle=False)
    except (OSError, CnnkitError) as error:
        reason = getattr(error, "strerror", None) or error
        log(f"frozen backbone: could not keep the features in {path.parent} ({reason}); "
            "the next run computes them again")

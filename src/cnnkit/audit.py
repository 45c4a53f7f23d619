"""What is wrong with the data: likely mislabelled images, duplicates and leakage between splits.

A user's own folder loses more accuracy to its data than to its model: a photo in the wrong class folder,
the same photo in train and test (the test accuracy then overstates), near-copies that make a split easier
than new photos will be. `cnnkit audit` finds them and writes what it found as CSV files with contact
sheets, so a person can look and fix the folder.

- **Label issues**: every training image gets a class probability from a model that never saw it (k-fold
  cross-validation: k models, each trained on the other folds with the run's or a cheap recipe), and
  cleanlab's confident learning (`find_label_issues`) picks the images whose given label the out-of-sample
  probabilities contradict, ranked by self-confidence (the probability of the given label, lowest first).
  Confident learning rather than "the model disagrees": it estimates per class how often each label is wrong
  and flags only as many images as that estimate allows, so a hard class is not flagged wholesale.
- **Duplicates**: exact copies by the SHA-256 of the decoded pixels, near-copies by the Hamming distance of a
  64-bit perceptual hash (the imagehash package's pHash: the low frequencies of a DCT of the 32x32 grey
  image, which JPEG re-encoding, resizing and a pixel's shift barely move). A perceptual hash rather than
  the model's embeddings: it needs no trained model, costs ~0.1 ms an image, and a distance threshold means
  the same thing on every dataset (benchmarks/audit.py measures recall and false pairs on CIFAR-10).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from cnnkit.config import FIT_FIELDS, TrainConfig, resolve_config
from cnnkit.data.registry import image_folder
from cnnkit.data.duplicates import aligned_correlation, close_hash_pairs, perceptual_hashes, pixel_digests
from cnnkit.data.tensors import Dataset, Split
from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_path, output_folder, write_text
from cnnkit.model_meta import read_model_meta
from cnnkit.report import write_report
from cnnkit.models.user import CUSTOM_PREFIX, UserCode, code_for_run
from cnnkit.runs import read_run_config, recorded_data_dirs
from cnnkit.text import printable
from cnnkit.data.download import data_root
from cnnkit.data.sources import load_raw
from cnnkit.data.disk import MEMORY_SHARE, available_memory, fits_in_memory
from cnnkit.data.folder import load_image_folder
from cnnkit.engine.fit import fit
from cnnkit.engine.inference import predict_logits
from cnnkit.stages.model import model_for
from cnnkit.stages.training import fit_probe
from cnnkit.engine.features import LINEAR_PROBE, features_folder, frozen_features

__all__ = ["AuditImages", "DuplicatePair", "LabelIssue", "audit_images", "duplicate_pairs", "find_label_issues",
           "out_of_sample_probabilities", "write_duplicates", "write_label_issues"]

#: Perceptual-hash distance (of 64 bits, at the best one-pixel shift) up to which two images are candidate
#: near-copies, and the grey-level correlation (at the best shift) a candidate must then reach. Chosen on
#: CIFAR-10's 10,000 test JPEGs with 300 planted copies of each kind: distance 4 found every copy re-encoded
#: at JPEG quality 50, resized 2x and back, or shifted by a pixel, whose correlations were 0.937 and more;
#: 32 pairs of distinct test images were within the distance, 15 of them correlating below 0.93
#: (benchmarks/audit.py measures the result).
NEAR_DISTANCE = 4
NEAR_CORRELATION = 0.93
SHEET_IMAGES = 32  # images on a contact sheet
#: Epochs of each fold's model, unless told: enough for its probabilities to rank MNIST's flipped labels (91.6% of
#: them in the top 5%, benchmarks/audit.py) at a fold's cost of three epochs.
FOLD_EPOCHS = 3
#: How many times the audit may hold its decoded images at its peak: the pool, a fold's training copy of most of it,
#: the copy its model is scored on. Measured on 4,000 128x128 colour images (197 MB decoded): the duplicate pass
#: peaked 323 MB above the process's own 315 MB (1.6x); the label pass adds its models' activations on top, as a
#: training of the same recipe would (2.8 GB for `fast` at 128 px with its 1,000-image evaluation batches).
AUDIT_COPIES = 3


@dataclass(frozen=True)
class AuditImages:
    """The images an audit looks at: each with its file (relative to the folder, or SPLIT/INDEX for a built-in
    dataset), its split and its given label; images uint8 (N, C, H, W) in memory."""

    name: str
    classes: list[str]
    files: list[str]
    splits: list[str]
    images: torch.Tensor
    labels: torch.Tensor

    def subset(self, keep: np.ndarray) -> AuditImages:
        index = np.flatnonzero(keep)
        return replace(self, files=[self.files[i] for i in index], splits=[self.splits[i] for i in index],
                       images=self.images[torch.from_numpy(index)], labels=self.labels[torch.from_numpy(index)])


@dataclass(frozen=True)
class LabelIssue:
    file: str
    given: str
    suggested: str
    score: float  # 1 - the out-of-sample probability of the given label: higher is more likely wrong
    index: int  # position in the audited images


@dataclass(frozen=True)
class DuplicatePair:
    file_a: str
    file_b: str
    distance: int  # perceptual-hash bits that differ; 0 with `exact` when the pixels are identical
    exact: bool
    split_a: str
    split_b: str
    index_a: int
    index_b: int

    @property
    def leak(self) -> bool:
        """A test image with a copy outside the test split: the test accuracy is partly a memory test."""
        return (self.split_a == "test") != (self.split_b == "test")


# ---------------------------------------------------------------------------------------------------------
# The images


def audit_images(dataset: str, data_dir: str | None, *, image_size: tuple[int, int] | None = None,
                 channels: int | None = None, limit: int | None = None, progress: bool = False) -> AuditImages:
    """Every image of `dataset` (a registered name or imagefolder:PATH) with its file name, split and label.
    `limit` keeps N training images drawn at random (seeded; a folder is listed class by class, so its first N
    would be its first classes), in their order."""

    folder = image_folder(dataset)
    if folder is not None:
        return _folder_images(folder, data_root(data_dir), image_size, channels, limit, progress)
    raw = load_raw(dataset, data_dir, progress=progress)
    parts = [(name, split) for name, split in (("train", raw.train), ("val", raw.val), ("test", raw.test))
             if split is not None]
    files, splits, images, labels = [], [], [], []
    for name, split in parts:
        keep = _kept(len(split), limit if name == "train" else None)
        width = len(str(len(split) - 1))
        files += [f"{name}/{index:0{width}d}" for index in keep.tolist()]
        splits += [name] * len(keep)
        images.append(split.images[keep])
        labels.append(split.labels[keep])
    return AuditImages(raw.name, list(raw.classes), files, splits, torch.cat(images), torch.cat(labels))


def _kept(count: int, limit: int | None) -> torch.Tensor:
    """Indices of the images kept: all, or `limit` of them drawn at random (seed 0), in order."""
    if limit is None or limit >= count:
        return torch.arange(count)
    return torch.from_numpy(np.sort(np.random.default_rng(0).permutation(count)[:limit]))


def _folder_images(folder: str, cache: Path, image_size, channels, limit, progress) -> AuditImages:
    root = Path(folder).expanduser().resolve()
    # Decoded into the cache chunk by chunk and left there until the room for them is known.
    data = load_image_folder(root, cache, image_size=image_size, channels=channels, progress=progress, on_disk=True)
    kept = {split: _kept(len(given), limit if split == "train" else None).numpy()
            for split, (_, given) in data.splits.items()}
    check_room(f"imagefolder:{root}", data.splits, kept)
    files, splits, images, labels = [], [], [], []
    for split, (pixels, given) in data.splits.items():
        keep = kept[split]
        files += [data.files[split][index] for index in keep]
        splits += [split] * len(keep)
        read = Split.from_numpy(pixels, given).take(torch.from_numpy(keep)).loaded()  # on disk or in memory
        images.append(read.images)
        labels.append(read.labels)
    return AuditImages(f"imagefolder:{root}", list(data.classes), files, splits, torch.cat(images),
                       torch.cat(labels))


def check_room(name: str, splits: dict, kept: dict[str, np.ndarray]) -> None:
    """Refuse, before reading them, images the audit cannot hold: it keeps every decoded image it audits in
    memory, about AUDIT_COPIES times at its peak. The way out is a sample of the training images (`--limit`)."""

    image_bytes = {split: int(np.prod(pixels.shape[1:])) for split, (pixels, _) in splits.items()}
    needed = AUDIT_COPIES * sum(image_bytes[split] * len(rows) for split, rows in kept.items())
    if fits_in_memory(needed):
        return
    room = available_memory() or 0
    others = AUDIT_COPIES * sum(image_bytes[split] * len(rows) for split, rows in kept.items() if split != "train")
    sample = max(0, int((room * MEMORY_SHARE - others) // (AUDIT_COPIES * image_bytes["train"])))
    count = sum(len(rows) for rows in kept.values())
    raise CnnkitError(f"{name}: its {count:,} images would take {needed / 2**30:.1f} GiB in memory during the audit, "
                      f"more than the {room / 2**30:.1f} GiB free; audit a sample of the training images: "
                      f"--limit {_round_down(sample)}" + ("" if sample else " (none fit beside the test images)"))


def _round_down(count: int) -> int:
    """`count` to two significant figures, rounded down: a sample size to suggest."""
    if count < 100:
        return count
    scale = 10 ** (len(str(count)) - 2)
    return count // scale * scale


# ---------------------------------------------------------------------------------------------------------
# Label issues


def out_of_sample_probabilities(config: TrainConfig, pool: AuditImages, folds: int,
                                log: Callable[[str], None] = print, code: UserCode | None = None) -> np.ndarray:
    """(N, K) class probabilities of every image of `pool`, each from the model of the fold that held it out.

    Each fold's model trains with `config` on the other folds and keeps its last epoch's weights: choosing an
    epoch on the held-out fold would let the images it scores pick the model that scores them. A recipe with a
    frozen backbone (`--freeze backbone`, the transfer-fast preset) trains as it did in its run: the backbone
    passes over the pool once (its vectors cached like a training's), and each fold trains a fresh head on them.
    """

    check_pool(pool, folds)
    count, classes = len(pool.labels), len(pool.classes)
    fold_of = np.random.default_rng(config.seed).permutation(count) % folds
    probabilities = np.zeros((count, classes), np.float32)
    config = replace(config, keep="last", patience=None, budget=None, ema=None)
    inputs, fresh_model = _fold_inputs(config, pool, code, log)
    probe_vectors = _probe_vectors(config, pool, fresh_model, log)
    for fold in range(folds):
        held = torch.from_numpy(fold_of == fold)
        trained = Split(inputs[~held], pool.labels[~held])
        scored = Split(inputs[held], pool.labels[held])
        if len(torch.unique(trained.labels)) < 2:
            raise CnnkitError(f"{pool.name}: fold {fold + 1} trains on fewer than two classes; an audit of labels "
                              "needs at least two classes with several images each")
        data = Dataset(pool.name, pool.classes, trained, scored, scored)
        model = fresh_model(data)
        if probe_vectors is not None:  # the recipe's probe (--probe-epochs) on this fold's images, as in training
            seen, unseen = Split(probe_vectors[~held], trained.labels), Split(probe_vectors[held], scored.labels)
            fit_probe(model.body.head_module(), Dataset(pool.name, pool.classes, seen, unseen, unseen), config)
        fit(model, data, config=config, progress=False)
        logits = predict_logits(model, scored.images, batch_size=config.eval_batch_size)
        probabilities[held.numpy()] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        log(f"fold {fold + 1}/{folds}: {int(held.sum()):,} images scored by a model that never saw them")
    return probabilities


def _fold_inputs(config: TrainConfig, pool: AuditImages, code: UserCode | None,
                 log: Callable[[str], None]) -> tuple[torch.Tensor, Callable[[Dataset], torch.nn.Module]]:
    """What each fold's model takes (the pool's images, or with a frozen backbone their pooled vectors) and a
    function giving a fold its untrained model (the recipe's, built on the fold's data; or the head as it starts)."""

    if config.freeze != "backbone":
        return pool.images, lambda fold: model_for(config, fold, code=code)

    whole = Split(pool.images, pool.labels)
    data = Dataset(pool.name, pool.classes, whole, whole.take(slice(0, 0)), whole.take(slice(0, 0)))
    model = model_for(config, data, code=code)
    head, features, summary = frozen_features(model, data, device=torch.device("cpu"),
                                              batch_size=config.eval_batch_size,
                                              folder=features_folder(config.data_dir), log=log)
    log(summary.describe())
    start = {name: tensor.clone() for name, tensor in head.state_dict().items()}

    def fresh_head(fold: Dataset) -> torch.nn.Module:
        head.load_state_dict(start)
        return head

    return features.train.images, fresh_head


def _probe_vectors(config: TrainConfig, pool: AuditImages, fresh_model: Callable[[Dataset], torch.nn.Module],
                   log: Callable[[str], None]) -> torch.Tensor | None:
    """The backbone's pooled vectors of the whole pool, for a fine-tuning recipe with a probe first
    (--probe-epochs): one backbone pass (cached like a training's), from which each fold's probe takes its
    training images' rows. None for any other recipe."""
    if not config.probe_epochs:  # (never with --freeze backbone: resolve_config refuses the two together)
        return None
    whole = Split(pool.images, pool.labels)
    data = Dataset(pool.name, pool.classes, whole, whole.take(slice(0, 0)), whole.take(slice(0, 0)))
    _, features, summary = frozen_features(fresh_model(data), data, device=torch.device("cpu"),
                                           batch_size=config.eval_batch_size, folder=features_folder(config.data_dir),
                                           log=log, splits=("train",), use=LINEAR_PROBE)
    log(summary.describe("linear probe"))
    return features.train.images


def check_pool(pool: AuditImages, folds: int) -> None:
    """Refuse, before any training, a pool that k-fold cross-validation cannot score: too few images for the
    folds, or fewer than two classes (a label cannot be wrong when there is only one)."""
    if folds < 2:
        raise CnnkitError(f"--folds must be at least 2 (one fold trains, another is scored), got {folds}")
    if len(np.unique(pool.labels.numpy())) < 2:
        raise CnnkitError(f"{pool.name}: only one class has training images; a label audit needs two or more")
    if len(pool.labels) < 2 * folds:
        raise CnnkitError(f"{pool.name}: {len(pool.labels)} training images are too few for {folds}-fold "
                          "cross-validation; use fewer --folds or a larger folder")


def find_label_issues(pool: AuditImages, probabilities: np.ndarray) -> list[LabelIssue]:
    """The images whose given label the out-of-sample probabilities contradict (cleanlab's confident learning),
    most likely issue first."""
    from cleanlab.filter import find_label_issues as confident_learning

    labels = pool.labels.numpy()
    ranked = confident_learning(labels, probabilities, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [LabelIssue(pool.files[i], pool.classes[labels[i]], pool.classes[int(probabilities[i].argmax())],
                       float(1.0 - probabilities[i, labels[i]]), int(i)) for i in ranked]


# ---------------------------------------------------------------------------------------------------------
# Duplicates


def duplicate_pairs(audit: AuditImages, max_distance: int = NEAR_DISTANCE) -> list[DuplicatePair]:
    """Every pair of images that are pixel-identical, or whose pHashes (at one-pixel shifts) differ in at most
    `max_distance` bits and whose grey levels then correlate by NEAR_CORRELATION or more; exact copies first,
    then by distance."""
    hashes, digests = perceptual_hashes(audit.images), pixel_digests(audit.images)
    images = audit.images.numpy()
    found = {pair: distance for pair, distance in close_hash_pairs(hashes, max_distance).items()
             if aligned_correlation(images[pair[0]], images[pair[1]]) >= NEAR_CORRELATION}
    by_digest: dict[bytes, list[int]] = {}
    for index, digest in enumerate(digests):
        by_digest.setdefault(digest, []).append(index)
    for members in by_digest.values():
        for position, first in enumerate(members):
            for second in members[position + 1 :]:
                found[first, second] = 0
    pairs = [DuplicatePair(audit.files[a], audit.files[b], distance, digests[a] == digests[b], audit.splits[a],
                           audit.splits[b], a, b) for (a, b), distance in found.items()]
    return sorted(pairs, key=lambda pair: (not pair.exact, pair.distance, pair.file_a, pair.file_b))


# ---------------------------------------------------------------------------------------------------------
# Writing what was found


def write_label_issues(issues: Sequence[LabelIssue], pool: AuditImages, out: Path) -> list[Path]:
    """DIR/label_issues.csv (file, given, suggested, score; most likely issue first) and its contact sheet."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["file", "given", "suggested", "score"])
    writer.writerows([issue.file, issue.given, issue.suggested, f"{issue.score:.4f}"] for issue in issues)
    written = [out / "label_issues.csv"]
    write_text(written[0], text.getvalue())
    if issues:
        shown = issues[:SHEET_IMAGES]
        captions = [f"{issue.file}\n{issue.given} -> {issue.suggested} ({issue.score:.2f})" for issue in shown]
        written.append(_contact_sheet([pool.images[issue.index] for issue in shown], captions,
                                      out / "label_issues.png", "Likely label issues: given -> suggested (score)"))
    return written


def write_duplicates(pairs: Sequence[DuplicatePair], audit: AuditImages, out: Path) -> list[Path]:
    """DIR/duplicates.csv (file_a, file_b, distance, exact, splits) and a sheet of the first pairs side by side."""
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["file_a", "file_b", "distance", "exact", "split_a", "split_b"])
    writer.writerows([pair.file_a, pair.file_b, pair.distance, "yes" if pair.exact else "no", pair.split_a,
                      pair.split_b] for pair in pairs)
    written = [out / "duplicates.csv"]
    write_text(written[0], text.getvalue())
    if pairs:
        shown = pairs[: SHEET_IMAGES // 2]
        images, captions = [], []
        for pair in shown:
            images += [audit.images[pair.index_a], audit.images[pair.index_b]]
            captions += [f"{pair.file_a}\n({pair.split_a})",
                         f"{pair.file_b}\n({pair.split_b}, distance {pair.distance})"]
        written.append(_contact_sheet(images, captions, out / "duplicates.png", "Duplicate pairs, side by side"))
    return written


def _contact_sheet(images: Sequence[torch.Tensor], captions: Sequence[str], path: Path, title: str) -> Path:
    """A grid of images with a caption under each, as one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 8
    rows = math.ceil(len(images) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(columns * 1.9, rows * 2.2), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, caption in zip(axes.flat, images, captions):
        array = image.numpy()
        axis.imshow(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
        axis.set_title("\n".join(printable(line) for line in caption.split("\n")), fontsize=6)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=90)
    plt.close(figure)
    return path


# ---------------------------------------------------------------------------------------------------------
# The command


@dataclass(frozen=True)
class AuditResult:
    images: int  # audited for duplicates: every split
    pool: int  # audited for label issues: the training images (train and val, never test)
    issues: list[LabelIssue]
    pairs: list[DuplicatePair]
    written: list[Path]

    @property
    def leaks(self) -> int:
        """Test images with a copy (exact or near) outside the test split."""
        return len({pair.index_a if pair.split_a == "test" else pair.index_b for pair in self.pairs if pair.leak})


def audit(target: str, out: str | Path | None = None, *, folds: int = 5, epochs: int | None = None,
          preset: str | None = None, model: str | None = None, max_distance: int = NEAR_DISTANCE,
          data_dir: str | None = None, limit: int | None = None, labels: bool = True, duplicates: bool = True,
          seed: int = 0, trust_code: bool = False, log: Callable[[str], None] = print) -> AuditResult:
    """Audit a run's dataset (with the run's recipe) or a dataset (with `preset`/`model`), writing what it finds
    into `out` (a run's own RUN/audit by default; a dataset needs `out`). A run whose model is a user's
    FILE.py is audited with that very file (its recorded SHA-256) and only with `trust_code`, as load_run."""
    _require("cleanlab" if labels else None, "imagehash" if duplicates else None)
    config, dataset, run_dir, code = _recipe(target, preset=preset, model=model, epochs=epochs, data_dir=data_dir,
                                             seed=seed, trust_code=trust_code)
    if out is None and run_dir is None:
        raise CnnkitError(f"audit {target}: name a folder for what it finds: --out DIR")
    folder = output_folder(out if out is not None else run_dir / "audit", "--out")
    size = tuple(config.image_size) if config.image_size else None
    found = audit_images(dataset, config.data_dir, image_size=size, channels=config.channels, limit=limit)
    pool = found.subset(np.array([split != "test" for split in found.splits]))
    if labels:
        check_pool(pool, folds)
    log(f"auditing {len(found.files):,} images of {printable(found.name)} ({len(found.classes)} classes)")
    folder.mkdir(parents=True, exist_ok=True)
    issues, pairs, written = [], [], []
    if labels:
        probabilities = out_of_sample_probabilities(config, pool, folds, log, code=code)
        issues = find_label_issues(pool, probabilities)
        written += write_label_issues(issues, pool, folder)
    if duplicates:
        pairs = duplicate_pairs(found, max_distance)
        written += write_duplicates(pairs, found, folder)
    if run_dir is not None and folder.resolve() == (run_dir / "audit").resolve():
        written.append(write_report(run_dir))  # its "Data audit" section shows what was found
    return AuditResult(len(found.files), len(pool.files), issues, pairs, written)


def _require(*packages: str | None) -> None:
    """One line naming the extra when a package an audit needs is not installed, before any work."""
    import importlib.util

    missing = [name for name in packages if name is not None and importlib.util.find_spec(name) is None]
    if missing:
        raise CnnkitError(f"cnnkit audit needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          'not installed: pip install "cnnkit[audit]"')


def _recipe(target: str, *, preset: str | None, model: str | None, epochs: int | None, data_dir: str | None,
            seed: int, trust_code: bool) -> tuple[TrainConfig, str, Path | None, UserCode | None]:
    """(the cross-validation recipe, the dataset, the run directory or None, the verified code of a run's FILE.py
    model or None) for a run or a dataset name."""
    config, dataset, run_dir, code = _recorded_recipe(target, preset=preset, model=model, data_dir=data_dir,
                                                      seed=seed, trust_code=trust_code)
    if epochs is None:  # a head on cached features trains in seconds: as many epochs as its recipe says
        epochs = config.epochs if config.freeze == "backbone" else FOLD_EPOCHS
    if not isinstance(epochs, int) or epochs < 1:
        raise CnnkitError(f"--epochs must be a whole number of at least 1, got {epochs!r}")
    return replace(config, epochs=epochs), dataset, run_dir, code


def _recorded_recipe(target: str, *, preset: str | None, model: str | None, data_dir: str | None, seed: int,
                     trust_code: bool) -> tuple[TrainConfig, str, Path | None, UserCode | None]:
    fixed = {"seed": seed, "data_dir": data_dir}
    if not (Path(target).expanduser() / "model.json").is_file():
        return resolve_config(preset, model=model, **fixed), target, None, None
    run_dir = Path(target).expanduser()
    meta = read_model_meta(run_dir)
    recorded = read_run_config(run_dir)
    # The recipe, not the machine it ran on: device, threads, processes and compilation are this machine's to choose.
    machine = {"device", "threads", "devices", "compile"}
    kept = {"model", "model_kwargs", "pretrained", "freeze", "freeze_bn", "probe_epochs", *FIT_FIELDS} - machine
    options = {key: value for key, value in recorded.options.items() if key in kept}
    code = None
    if model is not None or preset is not None:
        options = {"model": model} if model is not None else {}
    elif meta.code is not None:  # the run's own file, verified, never whatever config.json names
        code = code_for_run(run_dir, meta, trust_code)
        options["model"] = f"{code.path}:{code.function}"
    elif meta.architecture.startswith(CUSTOM_PREFIX):
        raise CnnkitError(f"{run_dir}: its model ({meta.architecture}) was a Python object, which the audit cannot "
                          "rebuild; name a recipe for the folds: --model NAME or --preset NAME")
    else:
        options["model"] = meta.architecture  # model.json's, checked against the weights; not config.json's
    if data_dir is None:
        located = [path for path, _ in recorded_data_dirs(run_dir, recorded) if path.is_dir()]
        fixed["data_dir"] = str(located[0]) if located else None
    if image_folder(meta.dataset) is not None:  # decoded as the run's images were
        fixed.update(dataset=meta.dataset, image_size=[meta.input.height, meta.input.width],
                     channels=meta.input.channels)
    return resolve_config(preset, **{**options, **fixed}), meta.dataset, run_dir, code

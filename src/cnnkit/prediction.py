"""Prediction on image files: each file is converted exactly as the run's model.json says.

The conversion itself (decode, resize, match the training data's background) lives in cnnkit.preprocess,
shared with training, which writes the record it follows.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cnnkit.data.images import not_a_file, to_image, walk_images
from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_path, output_folder, output_path, write_text
from cnnkit.text import printable, portable_name
from cnnkit.model_meta import ModelMeta
from cnnkit.preprocess import load_image
from cnnkit.progress import progress_bar
from cnnkit.engine.inference import predict_logits
from cnnkit.heatmaps import explain, named_layer, overlay
from cnnkit.registry import did_you_mean

__all__ = ["FilePredictions", "Prediction", "expand_image_paths", "find_image_files", "load_image", "predict",
           "predict_files", "predict_images", "prepare", "write_csv"]


@dataclass
class Prediction:
    file: str
    label: str
    confidence: float
    top: list[tuple[str, float]]

    def to_dict(self) -> dict:
        return {"file": self.file, "label": self.label, "confidence": self.confidence,
                "top": [[label, p] for label, p in self.top]}


def find_image_files(inputs: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """(the image files to predict, one 'PATH: why' for each input or entry that cannot be).

    Files are taken as given; directories give the image files inside them (recursively, hidden ones
    skipped, by the walk folder datasets use). Nothing here raises for one bad input: a missing path, an
    empty folder, a symlink loop named x.png or a FIFO is named in the second list and the rest go on.
    """
    paths: list[Path] = []
    problems: list[str] = []
    for item in inputs:
        path = Path(item)
        if _is_dir(path):
            found = walk_images(str(path))
            problems += [f"{path / entry.relpath}: {entry.problem}" for entry in found if entry.problem]
            readable = [path / entry.relpath for entry in found if not entry.problem]
            if not found:
                problems.append(f"{path}: no image files in this directory")
            paths.extend(readable)
        else:
            problem = _file_problem(path)
            if problem is None:
                paths.append(path)
            else:
                problems.append(f"{path}: {problem}")
    return paths, problems


def expand_image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, and the image files inside directories; the first unusable input is a CnnkitError."""
    paths, problems = find_image_files(inputs)
    if problems:
        raise CnnkitError(problems[0])
    return paths


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(path.stat().st_mode)
    except OSError:
        return False


def _file_problem(path: Path) -> str | None:
    """Why `path` cannot be opened as an image file (None when it can be tried): never opens it, since
    opening a FIFO would wait for a writer forever."""
    try:
        info = path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symlink loop"
        if error.errno == errno.ENOENT:
            return "is a dangling symlink" if path.is_symlink() else "no such file or directory"
        return f"cannot be read ({error.strerror or error})"
    return not_a_file(info.st_mode)


def predict(model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Class probabilities (N, K) for uint8 images (N, C, H, W)."""

    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8 or tensor.ndim != 4:
        raise CnnkitError(f"predict needs uint8 images shaped (N, C, H, W), got {tensor.dtype} {tuple(tensor.shape)}")
    return predict_logits(model, tensor, batch_size=batch_size).softmax(1)


#: Files decoded and predicted together: memory stays bounded for a folder of any size.
CHUNK = 256

ImageLike = str | Path | Image.Image | np.ndarray


@dataclass
class FilePredictions:
    """Predictions for the readable files, and each unreadable one with the reason it was skipped."""

    predictions: list[Prediction]
    skipped: list[str]


def prepare(item: ImageLike, meta: ModelMeta, name: str | None = None) -> np.ndarray:
    """One image (a path, a PIL image, or a uint8 array H x W or H x W x C) as the model's uint8 (C, H, W)."""
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or item.ndim not in (2, 3):
            raise CnnkitError(f"{name or 'array'}: expected a uint8 image array H x W or H x W x C, "
                              f"got {item.dtype} {item.shape}")
        item = Image.fromarray(item)
    return load_image(item, meta.input, meta.preprocessing, name=name)


def predict_images(run, images: Iterable[ImageLike], top: int = 1) -> list[Prediction]:
    """Predictions for images of any kind (paths, PIL images, uint8 arrays) with a loaded run."""
    items = list(images)
    names = [str(item) if isinstance(item, (str, Path)) else f"image {i}" for i, item in enumerate(items)]
    arrays = np.stack([prepare(item, run.meta, name) for item, name in zip(items, names)])
    return _ranked(run, names, predict(run.model, arrays, run.eval_batch_size), top)


def predict_files(run, inputs: Sequence[str | Path], top: int = 1, *, progress: bool = False,
                  show_input: str | Path | None = None, explain: str | Path | None = None,
                  explain_class: str | None = None, explain_layer: str | None = None) -> FilePredictions:
    """Predictions for image files and directories with a loaded run (see runs.load_run).

    An unreadable file is skipped and reported, not fatal: one bad photo in a folder should not cost the
    rest their answers. `show_input` writes each image as the model saw it (after preprocessing) to that
    folder, to see why an answer is wrong; `explain` writes each with its Grad-CAM heatmap for the predicted
    class (or `explain_class`) over it, read at the model's last spatial layer (or `explain_layer`, a name of
    the model's named_modules) (cnnkit.explain).
    """
    why = explanation_request(run, explain_class, explain_layer) if explain is not None else None
    paths, problems = find_image_files(inputs)
    result = FilePredictions([], problems)
    inputs_folder = output_folder(show_input, "--show-input") if show_input is not None else None
    explain_folder = output_folder(explain, "--explain") if explain is not None else None
    bar = progress_bar("Predicting", len(paths), enabled=progress and len(paths) > CHUNK)
    with _removed_if_interrupted(inputs_folder) as written, _removed_if_interrupted(explain_folder) as explained, \
            bar as advance:
        for start in range(0, len(paths), CHUNK):
            chunk, arrays = [], []
            for path in paths[start : start + CHUNK]:
                try:
                    arrays.append(prepare(path, run.meta))
                    chunk.append(path)
                except CnnkitError as error:
                    result.skipped.append(str(error))
            if arrays:
                batch = np.stack(arrays)
                if inputs_folder is not None:
                    _write_pictures(inputs_folder, chunk, [to_image(image) for image in batch], written, "--show-input")
                ranked = _ranked(run, [str(path) for path in chunk], predict(run.model, batch, run.eval_batch_size), top)
                if explain_folder is not None:
                    _write_pictures(explain_folder, chunk, _explained(run, batch, ranked, *why), explained,
                                    "--explain")
                result.predictions += ranked
            advance(len(paths[start : start + CHUNK]))
    return result


def _ranked(run, names: list[str], probabilities: torch.Tensor, top: int) -> list[Prediction]:
    k = max(1, min(top, probabilities.shape[1]))
    values, indices = probabilities.topk(k, dim=1)
    results = []
    for name, vals, idxs in zip(names, values.tolist(), indices.tolist()):
        ranked = [(run.classes[i], float(v)) for v, i in zip(vals, idxs)]
        results.append(Prediction(name, ranked[0][0], ranked[0][1], ranked))
    return results


@contextlib.contextmanager
def _removed_if_interrupted(folder: Path | None) -> Iterator[list[Path]]:
    """The list of files the block writes into `folder`; on Ctrl-C or SIGTERM they are removed (and `folder`
    when this command made it), so "nothing was saved" is true."""
    made = folder is not None and not folder.exists()
    written: list[Path] = []
    try:
        yield written
    except KeyboardInterrupt:
        if made:  # everything in it is this command's, a temp file the signal caught half-made included
            shutil.rmtree(folder, ignore_errors=True)
        for path in written:
            path.unlink(missing_ok=True)
        raise


def explanation_request(run, explain_class: str | None,
                        explain_layer: str | None) -> tuple[int | None, torch.nn.Module | None]:
    """(the class index to explain or None for each image's predicted class, the layer module or None),
    checked before any image is read: an unknown name is one line with the close ones."""

    target = None
    if explain_class is not None:
        if explain_class not in run.classes:
            raise CnnkitError(f"--explain-class {printable(explain_class)!r}: not a class of this run"
                              f"{did_you_mean(explain_class, run.classes)}; its classes: "
                              f"{printable(', '.join(run.classes[:20]))}{' ...' if len(run.classes) > 20 else ''}")
        target = run.classes.index(explain_class)
    layer = named_layer(run.model, explain_layer, "--explain-layer") if explain_layer is not None else None
    return target, layer


def _explained(run, batch: np.ndarray, ranked: list[Prediction], target: int | None,
               layer: torch.nn.Module | None) -> list:
    """Each image with the Grad-CAM heatmap of its predicted class (or `target`) over it, titled with the class
    explained and the prediction."""

    targets = [run.classes.index(p.label) if target is None else target for p in ranked]
    maps = explain(run.model, batch, targets, layer=layer, batch_size=min(64, run.eval_batch_size))
    titles = [f"{printable(p.label)}: {p.confidence:.1%}" if target is None else
              f"why {printable(run.classes[target])}? (said {printable(p.label)} {p.confidence:.0%})" for p in ranked]
    return [overlay(image, heatmap, title) for image, heatmap, title in zip(batch, maps, titles)]


def _write_pictures(folder: Path, paths: list[Path], pictures: list, written: list[Path], option: str) -> None:
    """Each picture as a PNG named after its image file (plus a hash of its path when two files share a name),
    each added to `written` as soon as it is in place. An existing file is replaced only if it is a regular
    file outside a run."""
    import hashlib

    folder.mkdir(parents=True, exist_ok=True)
    for path, picture in zip(paths, pictures):
        target = folder / f"{path.stem}.png"
        if target.exists() or target.is_symlink():
            target = folder / f"{path.stem}-{hashlib.sha1(os.fsencode(path)).hexdigest()[:8]}.png"
        if os.path.lexists(target):  # a picture of an earlier prediction, or something that is not ours to replace
            output_path(target, option, sweep=False)
        written.append(target)  # before it exists: an interruption after the rename must still remove it
        with atomic_path(target) as tmp:
            picture.save(tmp, format="PNG")


def write_csv(predictions: Sequence[Prediction], path: str | Path) -> None:
    """file,label,confidence,top: the top-k as 'label:probability' pairs separated by ';'."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["file", "label", "confidence", "top"])
    for p in predictions:
        writer.writerow([portable_name(p.file), p.label, f"{p.confidence:.6f}",
                         ";".join(f"{label}:{prob:.6f}" for label, prob in p.top)])
    write_text(path, text.getvalue())

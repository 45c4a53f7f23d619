"""Export a trained run as one self-contained inference graph: ONNX or TorchScript.

"The ONNX model gives different answers" nearly always means the caller's preprocessing differs from
training's. So the exported graph cannot be fed wrongly: it takes exactly what model.json describes, the
uint8 image tensor in pixel units (input "images", uint8, (batch, C, H, W), any batch size), applies the
scaling/standardisation itself and ends with the softmax (output "probabilities", float32 (batch, K), in
the order of the class list). An ONNX runtime rejects a float tensor or a wrong image size outright; the
TorchScript module checks dtype and shape itself.

Every export is checked before it is kept: the written file is loaded back (onnxruntime, or
`torch.jit.load`) and compared with PyTorch eager on real test images of the run's dataset; the largest
absolute difference of probabilities must be at most 1e-4 and the top-1 class identical on every image,
else nothing is written (an earlier export at the same path is left as it was).

    from cnnkit.export import export_run
    result = export_run("runs/train", "onnx")      # runs/train/model.onnx
    print(result.summary())
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_path, expand_user_path, output_path, removing_new_dirs_on_failure
from cnnkit import __version__
from cnnkit.runs import Run, load_run, recorded_data_dirs
from cnnkit.engine.cpu import keep_freed_memory
from cnnkit.data.folder import check_class_folders
from cnnkit.data.sources import DataLocation, default_location
from cnnkit.data.tensors import load_test_split

FORMATS = ("onnx", "torchscript")
DEFAULT_FILENAMES = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
#: Largest absolute difference of probabilities allowed between the export and PyTorch eager.
PARITY_TOLERANCE = 1e-4
#: Parity images run through both models this many at a time (also exercises the dynamic batch).
PARITY_BATCH = 256
#: Seed of the random uint8 images used when the run's dataset cannot be loaded.
FALLBACK_SEED = 0
#: The packages the ONNX path needs, with the module each is imported as (all in the `export` extra).
ONNX_PACKAGES = {"onnx": "onnx", "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}
#: File name, inside a TorchScript archive, of the same metadata an ONNX file carries in metadata_props.
TORCHSCRIPT_METADATA = "cnnkit.json"


def missing_extra_message(package: str) -> str:
    """The one-line message for an export dependency that is not installed."""
    return f"{package} is not installed; install the export extra: pip install 'cnnkit[export]'"


def require_onnx() -> None:
    """Raise CnnkitError naming the first missing ONNX export package, if any."""
    import importlib
    import inspect

    for package, module in ONNX_PACKAGES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            raise CnnkitError(missing_extra_message(package)) from None
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise CnnkitError(f"ONNX export needs torch 2.5 or newer (torch.onnx.export(dynamo=True)), this is torch "
                          f"{torch.__version__}; upgrade it: pip install -U 'torch>=2.5'")


@dataclass
class ExportResult:
    """What `export_run` wrote and how closely it matches PyTorch eager.

    `max_abs_diff`: largest |p_export - p_eager| over all images and classes; `top1_agreement`: fraction of
    images whose most likely class is the same (1.0 when the export is kept); `images`: how many were
    compared; `data`: what they were (the run's test images, or seeded random ones and why);
    `seconds`: the whole export, check included.
    """

    path: Path
    format: str
    max_abs_diff: float
    top1_agreement: float
    images: int
    seconds: float
    data: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "max_abs_diff": self.max_abs_diff,
                "top1_agreement": self.top1_agreement, "images": self.images, "seconds": self.seconds,
                "data": self.data}

    def summary(self) -> str:
        """One line for the command line."""
        size = self.path.stat().st_size / 1e6 if self.path.exists() else float("nan")
        return (f"wrote {self.path} ({self.format}, {size:.2f} MB) in {self.seconds:.1f}s; parity with PyTorch on "
                f"{self.images:,} {self.data}: max |diff| of probabilities {self.max_abs_diff:.2e} "
                f"(limit {PARITY_TOLERANCE:.0e}), top-1 agreement {self.top1_agreement:.2%}")


class ExportModule(nn.Module):
    """What is exported: uint8 images (batch, C, H, W) -> the classifier (scaling inside) -> softmax.

    The dtype and size checks are traced away by the ONNX exporter (the graph's typed, fixed-size input
    does that job there) and kept as code in a scripted TorchScript module.
    """

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model
        self.channels, self.height, self.width = (int(v) for v in input_shape)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError("images must be a uint8 tensor of pixel values 0-255 (the model scales them itself)")
        if (images.dim() != 4 or images.shape[1] != self.channels or images.shape[2] != self.height
                or images.shape[3] != self.width):
            raise ValueError("images must be (batch, {}, {}, {}) uint8".format(self.channels, self.height, self.width))
        return torch.softmax(self.model(images), dim=1)


def export_metadata(run) -> dict[str, str]:
    """The key/value strings stored with an export (ONNX metadata_props; a JSON file in TorchScript)."""

    classes = run.classes
    return {
        "classes": json.dumps(classes),
        "input": json.dumps({"name": INPUT_NAME, **run.meta.document["input"]}),
        "output": json.dumps({"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(classes)],
                              "meaning": "softmax probabilities, in the order of 'classes'"}),
        "preprocessing": json.dumps(run.meta.document["preprocessing"]),
        "architecture": run.meta.architecture,
        "dataset": run.meta.dataset,
        "tta": str(getattr(run, "tta", "none")),  # the graph averages the logits over these test-time views
        "cnnkit_version": __version__,
    }


def export_run(run_dir, format: str = "onnx", out: str | Path | None = None,  # noqa: A002 - the CLI's word
               parity_images: int = 1000, data_dir: str | Path | None = None,
               trust_code: bool = False) -> ExportResult:
    """Export a run's model as ONNX or TorchScript and check it against PyTorch eager.

    `run_dir`: a run directory (or a loaded Run). `out`: the file to write (default RUN/model.onnx or
    RUN/model.torchscript.pt; an existing directory gets that file name inside it). The check runs the
    written file on `parity_images` test images of the run's dataset, looked for in `data_dir`, else the
    run's recorded data_dir, else $CNNKIT_DATA or the default cache (never downloaded); when none holds
    them, on as many seeded random uint8 images, which `ExportResult.data` says. A failed check raises
    CnnkitError and writes nothing.

    TorchScript: the wrapper is scripted around a trace of the classifier, frozen (weights as constants)
    and saved with `torch.jit.save`, the metadata in the archive's extra file cnnkit.json.
    Loading a TorchScript file (`torch.jit.load`) executes code stored in that file, unlike the run's
    safetensors weights, so load only files you trust; it is for deployment targets that need
    TorchScript (C++ libtorch, mobile). ONNX is the portable choice.
    """

    started = time.perf_counter()
    if format not in FORMATS:
        raise CnnkitError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if isinstance(parity_images, bool) or not isinstance(parity_images, int) or parity_images < 1:
        raise CnnkitError(f"parity_images must be a whole number of at least 1, got {parity_images!r}")
    if format == "onnx":
        require_onnx()
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir, trust_code=trust_code)
    path = _output_path(run.path, format, out)
    images, data = parity_data(run, parity_images, data_dir)
    wrapper = ExportModule(run.model, run.input_shape).eval()
    keep_freed_memory()  # as every forward pass of cnnkit's (engine/cpu.py)
    batch_size = min(PARITY_BATCH, run.eval_batch_size)  # a large network's recorded, smaller batch
    with torch.inference_mode():
        expected = torch.cat([wrapper(batch) for batch in images.split(batch_size)]).numpy()
    write = _write_onnx if format == "onnx" else _write_torchscript
    try:
        with removing_new_dirs_on_failure(path.parent), atomic_path(path) as tmp:
            candidate = write(wrapper, run, tmp)
            max_diff, agreement = compare(expected, candidate, images, batch_size)
            if not (max_diff <= PARITY_TOLERANCE and agreement == 1.0):
                raise CnnkitError(
                    f"{path}: the {format} export does not match PyTorch on {len(images):,} {data} (max |diff| "
                    f"of probabilities {max_diff:.2e}, limit {PARITY_TOLERANCE:.0e}; top-1 agreement "
                    f"{agreement:.2%}); nothing was written. Please report this with the run's model.json")
    except OSError as error:
        reason = error.strerror or error
        raise CnnkitError(f"{path}: cannot write the export ({reason}); choose another --out") from None
    return ExportResult(path=path, format=format, max_abs_diff=max_diff, top1_agreement=agreement,
                        images=len(images), seconds=time.perf_counter() - started, data=data)


def _output_path(run_dir: Path, format: str, out: str | Path | None) -> Path:  # noqa: A002
    own = Path(run_dir) / DEFAULT_FILENAMES[format]
    if out is None:
        return output_path(own, "--out", own=own)
    out = expand_user_path(out, "--out")
    path = out / DEFAULT_FILENAMES[format] if out.is_dir() else out  # a folder, or a link to one
    return output_path(path, "--out", own=own)


# ---------------------------------------------------------------------------------------------------------
# The parity check


def parity_data(run, count: int, data_dir: str | Path | None = None) -> tuple[torch.Tensor, str]:
    """`count` uint8 test images of the run's dataset and what they are; seeded random ones if unavailable."""

    channels, height, width = run.input_shape
    dataset = run.meta.dataset
    if data_dir:
        locations = [DataLocation(Path(data_dir).expanduser(), "data_dir")]
    else:
        locations = [DataLocation(path, origin) for path, origin in recorded_data_dirs(run.path, run.config)]
        locations.append(default_location())
    try:
        if not isinstance(dataset, str):
            raise CnnkitError(f"{run.path / 'model.json'} names no dataset")
        check_class_folders(dataset, run.classes)  # a wrong folder is refused before it is decoded
        test = load_test_split(dataset, locations=locations, limit=count, download=False,
                               image_size=(height, width), channels=channels, progress=False).test
        if len(test) and tuple(test.images.shape[1:]) == (channels, height, width):
            return test.images.contiguous(), f"{dataset} test images"
        why = f"its test images are {tuple(test.images.shape[1:])}, the model takes {(channels, height, width)}"
    except (CnnkitError, OSError, ValueError) as error:
        why = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    generator = torch.Generator().manual_seed(FALLBACK_SEED)
    images = torch.randint(0, 256, (count, channels, height, width), dtype=torch.uint8, generator=generator)
    return images, f"seeded random uint8 images (the {dataset} test set could not be loaded: {why})"


def compare(expected: np.ndarray, candidate: Callable[[np.ndarray], np.ndarray],
            images: torch.Tensor, batch_size: int = PARITY_BATCH) -> tuple[float, float]:
    """(max |expected - candidate|, top-1 agreement) with `candidate` run on `images` in chunks of `batch_size`."""
    got = np.concatenate([np.asarray(candidate(batch.numpy()), dtype=np.float32)
                          for batch in images.split(batch_size)])
    if got.shape != expected.shape:
        return float("inf"), 0.0
    max_diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    agreement = float(np.mean(got.argmax(axis=1) == expected.argmax(axis=1))) if len(got) else 1.0
    return max_diff, agreement


# ---------------------------------------------------------------------------------------------------------
# The writers: each writes `tmp` and returns a function running the written file on a uint8 numpy batch


def _example(run) -> torch.Tensor:
    """A batch of 2 (not 1, which exporters may specialise as a constant) random uint8 images."""
    generator = torch.Generator().manual_seed(FALLBACK_SEED)
    return torch.randint(0, 256, (2, *run.input_shape), dtype=torch.uint8, generator=generator)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporters' chatter (deprecation notes, 'torchvision is not installed' warnings)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _write_onnx(wrapper: ExportModule, run, tmp: Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                wrapper, (_example(run),), None, dynamo=True, verbose=False, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch", min=1)}})
        except ImportError as error:
            raise CnnkitError(missing_extra_message(error.name or "onnxscript")) from None
    program.model.metadata_props.update(export_metadata(run))
    channels, height, width = run.input_shape
    program.model.doc_string = (
        f"cnnkit {run.meta.architecture} classifier of {run.meta.dataset}: input '{INPUT_NAME}' is "
        f"uint8 (batch, {channels}, {height}, {width}) pixel values 0-255, scaled inside the graph; output "
        f"'{OUTPUT_NAME}' is float32 (batch, {len(run.classes)}) softmax probabilities in the order of the "
        f"'classes' metadata")
    program.save(str(tmp), external_data=False)
    session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    return lambda batch: session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def _write_torchscript(wrapper: ExportModule, run, tmp: Path) -> Callable[[np.ndarray], np.ndarray]:
    with _quiet_exporter(), torch.no_grad():  # torch 2.13 marks torch.jit deprecated; it still works
        traced = torch.jit.trace(wrapper.model, (_example(run),))
        # Frozen: weights become constants (no autograd state), eval-mode code only.
        scripted = torch.jit.freeze(torch.jit.script(ExportModule(traced, run.input_shape).eval()))
        # Saved to memory and written by Python: torch.jit.save to a file on a full disk aborts the process in C++
        # ("terminate called after throwing c10::Error", exit 134), with no chance to remove the temp file.
        archive = io.BytesIO()
        torch.jit.save(scripted, archive, _extra_files={TORCHSCRIPT_METADATA: json.dumps(export_metadata(run))})
        with open(tmp, "wb") as handle:
            handle.write(archive.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        loaded = torch.jit.load(str(tmp), map_location="cpu")  # the written file, not the object in memory
    loaded.eval()

    def run_loaded(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return loaded(torch.from_numpy(batch)).numpy()

    return run_loaded


def load_torchscript_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored in a cnnkit TorchScript export, JSON values decoded (classes, input, ...)."""
    files = {TORCHSCRIPT_METADATA: ""}
    with _quiet_exporter():
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return _decode(json.loads(files[TORCHSCRIPT_METADATA]))


def _decode(props: dict[str, str]) -> dict[str, Any]:
    decoded: dict[str, Any] = {}
    for key, value in props.items():
        try:
            decoded[key] = json.loads(value) if key in ("classes", "input", "output", "preprocessing") else value
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded

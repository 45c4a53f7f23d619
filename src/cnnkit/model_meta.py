"""model.json checked against a schema with bounds, and against the weights beside it, before anything is built.

A run directory is something people share, so its model.json is input like any other: a string where a
number belongs, an input height of 200,000 (a model that asks for terabytes), `classes` as one string, an
input size that no longer matches the weights, or an `imagefolder:` dataset pointing anywhere. Every field
that loading, preprocessing or evaluation reads is checked here first, and a bad one is a CnnkitError
naming model.json, the field and what was found.

The checks are hand-written rather than a pydantic model (as metrics.json's are, in `records`): every rule
here needs a message that says what to do (which `--model` the weights fit, which dataset's classes differ
where), the cross-field rules outnumber the type rules, and loading a run for `predict` stays free of
pydantic's import. What comes out is a typed record, `ModelMeta`, not a dict: the rest of cnnkit reads
`meta.input.height`, never `meta["input"]["height"]`.

The weights are checked without reading them: safetensors headers give every tensor's name and shape, and
a registry model is first built on PyTorch's "meta" device (shapes only, no memory), so a tampered
architecture, class count or model_kwargs is refused before a single real parameter is allocated. A run
saved by this version also records in the weights file's header what model.json said (input size,
classes, architecture, model_kwargs), which catches edits that change no tensor shape (the `fast` model
takes any input size).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError
from cnnkit.fileio import UnreadableFile, read_json, require_regular_file
from cnnkit.inputs import InputSpec, Preprocessing
from cnnkit.data.registry import DATASETS, image_folder

__all__ = ["MAX_CLASSES", "MAX_PIXELS", "MAX_SIDE", "MODEL_FORMAT", "MODEL_FORMAT_VERSION", "InputSpec",
           "ModelMeta", "Preprocessing", "WeightsHeader", "check_model_meta", "check_recorded", "check_standardisation",
           "input_text", "read_weights_header", "skeleton_state", "weights_record"]

MODEL_FORMAT = "cnnkit.model"
MODEL_FORMAT_VERSION = 1
#: Bounds of a model input: far above any run cnnkit trains (MNIST 28, CIFAR 32, folders as their images),
#: far below a size whose single image (let alone a batch) exhausts memory.
MAX_SIDE = 8192
MAX_PIXELS = 4096 * 4096
MAX_CLASSES = 100_000
MAX_NAME = 1000  # characters of a class name or an architecture
TTA_NAMES = ("none", "flip", "shift", "flip-shift")
#: Keys of the safetensors header metadata that record what model.json said when the weights were saved.
RECORDED = ("cnnkit.architecture", "cnnkit.model_kwargs", "cnnkit.classes", "cnnkit.input")


# ---------------------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True)
class ModelMeta:
    """model.json of a run, checked (check_model_meta): what to build, what it takes, what its outputs mean."""

    architecture: str  # a registry name, custom:<class>, or the FILE.py:FUNCTION a user model came from
    model_kwargs: dict[str, Any]
    classes: tuple[str, ...]  # the outputs, in order
    dataset: str  # a registered dataset name or imagefolder:PATH
    input: InputSpec
    preprocessing: Preprocessing
    tta: str = "none"  # the test-time augmentation the run was tested with (one of TTA_NAMES)
    flip: bool | None = None  # trained with mirrored images (None: a run from before this was recorded)
    mirror_ok: bool | None = None  # the dataset's classes survive mirroring (None: not recorded)
    code: dict[str, Any] | None = None  # a user model's file: path, sha256, function (checked where it is run)
    #: model.json as read, with defaults filled in: what an export's metadata and the server's /model repeat,
    #: unknown fields of a later version included.
    document: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __getitem__(self, key: str) -> Any:
        """`run.meta["classes"]`: what code written when `Run.meta` was model.json's dict keeps doing."""
        return self.document[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.document.get(key, default)


# ---------------------------------------------------------------------------------------------------------
# The schema


class _Fields:
    """Typed reads of one JSON object's fields; every failure names the file and the dotted field."""

    def __init__(self, data: Any, path: Path, prefix: str = "") -> None:
        self.path, self.prefix = path, prefix
        if not isinstance(data, dict):
            raise self.error(prefix.rstrip(".") or "the file", f"must be a JSON object, got {_shown(data)}")
        self.data = data

    def error(self, name: str, problem: str) -> CnnkitError:
        return CnnkitError(f"{self.path}: {self.prefix}{name} {problem}; the file was edited or damaged "
                           f"(re-save the run, or train it again)")

    def get(self, name: str, *, required: bool = True, default: Any = None) -> Any:
        if name not in self.data:
            if required:
                raise self.error(name, "is missing")
            return default
        return self.data[name]

    def string(self, name: str, *, required: bool = True, default: str | None = None,
               choices: tuple[str | None, ...] | None = None, longest: int = MAX_NAME) -> str | None:
        value = self.get(name, required=required, default=default)
        if choices is not None:
            if value not in choices:
                raise self.error(name, f"must be one of {', '.join(map(str, choices))}, got {_shown(value)}")
            return value
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value or len(value) > longest:
            raise self.error(name, f"must be a non-empty string of at most {longest} characters, got {_shown(value)}")
        return value

    def integer(self, name: str, low: int, high: int) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(name, f"must be a whole number from {low} to {high:,}, got {_shown(value)}")
        return value

    def flag(self, name: str) -> bool | None:
        value = self.get(name, required=False)
        if value is not None and not isinstance(value, bool):
            raise self.error(name, f"must be true or false, got {_shown(value)}")
        return value

    def numbers(self, name: str, count: int, *, positive: bool = False) -> list[float]:
        value = self.get(name)
        ok = (isinstance(value, list) and len(value) == count
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (v > 0 or not positive) for v in value))
        if not ok:
            what = "positive" if positive else "finite"
            raise self.error(name, f"must be a list of {count} {what} number{'s' if count > 1 else ''} (one per "
                                   f"channel), got {_shown(value)}")
        return [float(v) for v in value]

    def table(self, name: str, *, required: bool = True) -> dict[str, Any] | None:
        value = self.get(name, required=required)
        if value is None and not required:
            return None
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            raise self.error(name, f"must be a JSON object, got {_shown(value)}")
        return value

    def nested(self, name: str) -> _Fields:
        return _Fields(self.get(name), self.path, f"{self.prefix}{name}.")


def check_model_meta(data: Any, path: Path) -> ModelMeta:
    """model.json's content, checked field by field, as a ModelMeta record.

    Raises CnnkitError naming `path` and the first bad field. Fields this version does not know are kept
    and ignored (a later format version would say so in `format_version`).
    """
    fields = _Fields(data, path)
    if fields.get("format", required=False) != MODEL_FORMAT:
        raise CnnkitError(f"{path}: not a cnnkit model description (its \"format\" is not {MODEL_FORMAT!r})")
    version = fields.get("format_version", required=False, default=1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise fields.error("format_version", f"must be a whole number from 1, got {_shown(version)}")
    if version > MODEL_FORMAT_VERSION:
        raise CnnkitError(f"{path}: made by a newer cnnkit (format {version}; this one reads up to "
                          f"{MODEL_FORMAT_VERSION}): upgrade cnnkit")
    meta = dict(data)
    meta["architecture"] = fields.string("architecture")
    meta["model_kwargs"] = fields.table("model_kwargs", required=False) or {}
    meta["classes"] = _classes(fields)
    meta["dataset"] = fields.string("dataset", longest=4096)
    meta["input"] = _input(fields)
    channels = meta["input"]["channels"]
    meta["preprocessing"] = _preprocessing(fields.nested("preprocessing"), meta["input"])
    meta["tta"] = fields.string("tta", required=False, default="none", choices=TTA_NAMES)
    for name in ("flip", "mirror_ok"):
        if name in meta:
            meta[name] = fields.flag(name)
    meta["code"] = fields.table("code", required=False)
    _check_dataset(fields, meta["dataset"], meta["classes"], (channels, meta["input"]["height"],
                                                             meta["input"]["width"]))
    spec, steps = meta["input"], meta["preprocessing"]
    return ModelMeta(
        architecture=meta["architecture"], model_kwargs=meta["model_kwargs"], classes=tuple(meta["classes"]),
        dataset=meta["dataset"], input=InputSpec(spec["channels"], spec["height"], spec["width"]),
        preprocessing=Preprocessing(tuple(steps["mean"]), tuple(steps["std"]), steps["background"],
                                    steps["layout"]),
        tta=meta["tta"], flip=meta.get("flip"), mirror_ok=meta.get("mirror_ok"), code=meta["code"], document=meta)


def _classes(fields: _Fields) -> list[str]:
    value = fields.get("classes")
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_CLASSES:
        raise fields.error("classes", f"must be a list of 1 to {MAX_CLASSES:,} class names, got {_shown(value)}")
    bad = [name for name in value if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME]
    if bad:
        raise fields.error("classes", f"must hold non-empty strings of at most {MAX_NAME} characters, got "
                                      f"{_shown(bad[0])}")
    if len(set(value)) != len(value):
        seen: set[str] = set()
        twice = next(name for name in value if name in seen or seen.add(name))
        raise fields.error("classes", f"names {twice!r} twice (each class needs its own name)")
    return list(value)


def _input(fields: _Fields) -> dict[str, Any]:
    spec = fields.nested("input")
    record = dict(spec.data)
    record["channels"] = spec.get("channels")
    if type(record["channels"]) is not int or record["channels"] not in (1, 3):
        raise spec.error("channels", f"must be 1 (grayscale) or 3 (RGB), got {_shown(record['channels'])}")
    record["height"] = spec.integer("height", 1, MAX_SIDE)
    record["width"] = spec.integer("width", 1, MAX_SIDE)
    if record["height"] * record["width"] > MAX_PIXELS:
        raise spec.error("height", f"x width is {record['height']}x{record['width']}, over the "
                                   f"{MAX_PIXELS / 1e6:.1f} megapixels a model input may have")
    spec.string("dtype", required=False, default="uint8", choices=("uint8",))
    spec.string("layout", required=False, default="NCHW", choices=("NCHW",))
    return record


def _preprocessing(spec: _Fields, shape: dict[str, Any]) -> dict[str, Any]:
    channels = shape["channels"]
    record = dict(spec.data)
    record["mean"] = spec.numbers("mean", channels)
    record["std"] = spec.numbers("std", channels, positive=True)
    mode = spec.string("color_mode", required=False, default=None, choices=(None, "L", "RGB"))
    if mode is not None and mode != ("L" if channels == 1 else "RGB"):
        raise spec.error("color_mode", f"is {mode!r}, but the input has {channels} channel(s)")
    spec.string("resize", required=False, default="bilinear", choices=("bilinear",))
    record["background"] = spec.string("background", required=False, choices=(None, "dark", "light"))
    record["layout"] = spec.string("layout", required=False, choices=(None, "mnist"))
    if record["layout"] == "mnist" and (channels, shape["height"], shape["width"]) != (1, 28, 28):
        raise spec.error("layout", f"is 'mnist', which needs a 1x28x28 input, not {input_text(shape)}")
    return record


def _check_dataset(fields: _Fields, dataset: str, classes: list[str], shape: tuple[int, int, int]) -> None:
    """A built-in dataset fixes the input shape and the classes; an image folder needs a path."""

    spec = DATASETS.get(dataset)
    if spec is not None:
        if tuple(shape) != tuple(spec.shape):
            raise fields.error("input", f"is {'x'.join(map(str, shape))}, but dataset {dataset}'s images are "
                                        f"{'x'.join(map(str, spec.shape))}")
        if list(classes) != list(spec.classes):
            raise fields.error("classes", f"are not dataset {dataset}'s {len(spec.classes)} classes in order "
                                          f"({_class_difference(classes, list(spec.classes))})")
    elif (folder := image_folder(dataset)) is not None and not folder.strip():
        raise fields.error("dataset", "is 'imagefolder:' without a folder")


def _class_difference(ours: list[str], theirs: list[str]) -> str:
    """Where two class lists first differ, in a few words."""
    if len(ours) != len(theirs):
        return f"{len(ours)} here, {len(theirs)} there"
    index = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
    return f"class {index} is {ours[index]!r} here, {theirs[index]!r} there"


def input_text(spec: dict[str, Any]) -> str:
    return f"{spec['channels']}x{spec['height']}x{spec['width']}"


def _shown(value: Any) -> str:
    """A value for an error message, cut short: a tampered file may hold a megabyte in one field."""
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------------------
# The weights beside it


@dataclass(frozen=True)
class WeightsHeader:
    """What a safetensors file says about itself without its tensors being read: shapes and metadata."""

    path: Path
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str]

    def meta_tensors(self) -> dict[str, Any]:
        """The tensors as shape-only tensors on the meta device (no memory), for key-by-key comparison."""
        import torch

        return {key: torch.empty(shape, device="meta") for key, shape in self.shapes.items()}

    def tensor(self, key: str):
        """One (small) tensor read from the file, e.g. the stored input standardisation."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                return handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise CnnkitError(f"{self.path}: cannot load weights ({type(error).__name__}: {error})") from None


def read_weights_header(path: Path) -> WeightsHeader:
    """The header of a safetensors file (names, shapes, metadata); the file's data is not read."""
    from safetensors import SafetensorError, safe_open

    try:
        require_regular_file(path)
        with safe_open(str(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
            metadata = dict(handle.metadata() or {})
    except FileNotFoundError:
        raise CnnkitError(f"{path}: file not found") from None
    except UnreadableFile:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CnnkitError(f"{path}: cannot load weights ({first})") from None
    return WeightsHeader(Path(path), shapes, metadata)


def weights_record(meta: dict[str, Any]) -> dict[str, str]:
    """What save_model writes into the weights file's header: model.json's fields the weights depend on."""
    return {
        "cnnkit.architecture": str(meta["architecture"]),
        "cnnkit.model_kwargs": json.dumps(meta.get("model_kwargs") or {}, sort_keys=True),
        "cnnkit.classes": json.dumps(list(meta["classes"])),
        "cnnkit.input": input_text(meta["input"]),
    }


def check_recorded(meta: ModelMeta, header: WeightsHeader, meta_path: Path) -> None:
    """Refuse a model.json that no longer says what it said when the weights were saved (runs saved by
    earlier versions record nothing, and are checked by tensor shapes alone)."""
    recorded = {key: header.metadata[key] for key in RECORDED if key in header.metadata}
    if not recorded:
        return
    ours = weights_record(meta.document)
    for key, theirs in recorded.items():
        if _normalised(key, ours[key]) != _normalised(key, theirs):
            raise CnnkitError(f"{meta_path} does not match {header.path.name}: "
                              f"{_what_differs(key, ours[key], theirs)}; model.json was edited, or the weights belong "
                              "to another run")


def _normalised(key: str, text: str) -> Any:
    try:
        return json.loads(text) if key in ("cnnkit.model_kwargs", "cnnkit.classes") else text
    except ValueError:
        return text


def _what_differs(key: str, ours: str, theirs: str) -> str:
    field = key.removeprefix("cnnkit.")
    if key == "cnnkit.classes":
        mine, saved = json.loads(ours), _normalised(key, theirs)
        if isinstance(saved, list):
            return f"its classes differ from those the weights were saved with ({_class_difference(mine, saved)})"
    shown = {"input": "input (channels x height x width)"}.get(field, field)
    return f"model.json says {shown} {_cut(ours)}, the weights were saved with {_cut(theirs)}"


def _cut(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def skeleton_state(meta: ModelMeta, meta_path: Path) -> dict[str, Any]:
    """The state dict (names and shapes, on the meta device: no memory) of the registry model `meta`
    describes: what its weights file must hold. Refuses model_kwargs the architecture cannot be built with."""
    import torch

    from cnnkit.models.builder import skeleton

    shape = meta.input.shape
    try:
        body = skeleton(meta.architecture, shape, len(meta.classes), **meta.model_kwargs)
    except CnnkitError as error:
        raise CnnkitError(f"{meta_path}: {error}; the file was edited or damaged") from None
    standardisation = torch.empty((1, shape[0], 1, 1), device="meta")
    return {"rescale.scale": standardisation, "rescale.offset": standardisation,
            **{f"body.{key}": value for key, value in body.state_dict().items()}}


def check_standardisation(meta: ModelMeta, scale: Any, offset: Any, meta_path: Path, weights: Path) -> None:
    """model.json's preprocessing mean/std must be the standardisation stored in the weights (rescale.*),
    which is what the model applies: a mismatch means model.json lies about how inputs are treated."""
    import torch

    scale, offset = scale.flatten().double(), offset.flatten().double()
    expected_scale = 1.0 / torch.tensor(meta.preprocessing.std, dtype=torch.float64)
    expected_offset = -torch.tensor(meta.preprocessing.mean, dtype=torch.float64) * expected_scale
    if scale.shape != expected_scale.shape or not (
            torch.allclose(scale, expected_scale, rtol=1e-5, atol=1e-12)
            and torch.allclose(offset, expected_offset, rtol=1e-5, atol=1e-6)):
        stored_std = [round(float(v), 4) for v in (1.0 / scale).tolist()] if scale.numel() else []
        stored_mean = [round(float(v), 4) for v in (-offset / scale).tolist()] if scale.numel() else []
        raise CnnkitError(f"{meta_path} does not match {weights.name}: model.json says preprocessing mean "
                          f"{_cut(str(list(meta.preprocessing.mean)))} std {_cut(str(list(meta.preprocessing.std)))}, "
                          f"the weights standardise with mean {_cut(str(stored_mean))} std {_cut(str(stored_std))}; "
                          "model.json was edited, or the weights belong to another run")


def resolve_run_dir(path: str | Path) -> Path:
    """A run directory, or a model.json inside one."""
    path = Path(path)
    if path.is_file() and path.name == "model.json":
        path = path.parent
    if not (path / "model.json").is_file():
        raise CnnkitError(f"{path}: not a cnnkit run directory (no model.json){similar_run(path)}")
    return path


def similar_run(path: Path) -> str:
    """"; did you mean runs/tour?" when a run directory beside `path` has a close name, else ""."""
    import difflib

    try:
        names = [entry.name for entry in path.parent.iterdir()
                 if not entry.name.startswith(".") and (entry / "model.json").is_file()]
    except OSError:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"; did you mean {path.parent / close[0]}?" if close and close[0] != path.name else ""


def read_model_meta(run_dir: Path) -> ModelMeta:
    """model.json, checked against its schema (types, bounds, the dataset's shape)."""

    return check_model_meta(read_json(run_dir / "model.json"), run_dir / "model.json")

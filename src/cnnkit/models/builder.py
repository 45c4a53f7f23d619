"""Build a registered architecture inside its ImageClassifier wrapper."""

from __future__ import annotations

import json
import numbers
import os
import types
import typing
from collections.abc import Sequence
from typing import Any

import torch

from cnnkit.errors import CnnkitError
from cnnkit.models.classifier import ImageClassifier
from cnnkit.models.registry import ModelEntry, get_entry


def model_entry(name: str) -> ModelEntry:
    """The registry entry for `name` (builder, description, whether it standardises its input)."""
    return get_entry(name)


def build_model(
    name: str = "seed",
    input_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    seed: int | None = 0,
    **kwargs,
) -> ImageClassifier:
    """A fresh model by registry name for images of `input_shape` (C, H, W) and `num_classes` classes.

    Without `mean`/`std` the input is scaled to [0, 1] (the tutorial's x / 255); pass the training
    set's per-channel statistics (pixel units) to standardise instead. The initial weights are drawn
    from `seed` (default 0, the CLI's default) without touching the global random state, so two identical
    scripts build identical models; `seed=None` draws from the global generator instead.
    """
    entry = get_entry(name)
    shape = tuple(int(v) for v in input_shape)
    check_model_size(name, shape, num_classes, skeleton(name, shape, num_classes, **kwargs))
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        body = entry.builder(input_shape=shape, num_classes=num_classes, **kwargs)
    mean = list(mean) if mean is not None else [0.0] * shape[0]
    std = list(std) if std is not None else [255.0] * shape[0]
    model = ImageClassifier(body, mean, std)
    model.architecture, model.model_kwargs, model.input_shape = name, dict(kwargs), shape
    return model


# ---------------------------------------------------------------------------------------------------------
# Sizing a model before it exists

#: Training holds every parameter about four times (weights, gradients, Adam's two moments): a model whose
#: parameters alone take more than this share of the machine's memory cannot train, and is refused before
#: its allocation (which the kernel would answer by killing the process) instead.
MEMORY_SHARE = 0.25


def skeleton(name: str, input_shape: Sequence[int], num_classes: int, **kwargs) -> torch.nn.Module:
    """The body `name` builds, on the meta device: every parameter's shape, no memory, no initialisation.

    Arguments the builder rejects (model_kwargs it does not take, or of the wrong kind) are a CnnkitError
    naming them, since they come from the user's --model-kwargs or a run's model.json.
    """
    entry = get_entry(name)
    check_kinds(name, entry.builder, kwargs)
    try:
        with torch.device("meta"), shapes_only():
            return entry.builder(input_shape=tuple(input_shape), num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        shown = json.dumps(kwargs, default=str)
        raise CnnkitError(f"model {name!r} cannot be built with model_kwargs {shown[:80]} for input "
                          f"{'x'.join(map(str, input_shape))} and {num_classes} classes ({first[:120]})") from None


def check_kinds(name: str, builder, kwargs: dict[str, Any]) -> None:
    """Refuse a model_kwargs value of another kind than the builder's annotation says (`"resolution": "64"`): a
    builder may take it without complaint and then compute with a string (the evaluation batch was not sized)."""
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # an annotation that cannot be resolved: the builder's own checks decide
        return
    for key, value in kwargs.items():
        if key in hints and not fits(value, hints[key]):
            kind = hints[key].__name__ if isinstance(hints[key], type) else \
                str(hints[key]).replace("typing.", "").replace("collections.abc.", "")
            raise CnnkitError(f"model {name!r}: model_kwargs {key} must be {kind}, got "
                              f"{json.dumps(value, default=repr)[:80]}")


def fits(value: Any, kind: Any) -> bool:
    """Whether a JSON value (from --model-kwargs or model.json) is of the annotated kind; True for kinds not
    checked here. A bool is not a number, an integer is a float, a list is a sequence or tuple."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind in (bool, str):
        return isinstance(value, kind)
    if kind in (int, float):  # numpy's numbers too, from Python
        return isinstance(value, numbers.Integral if kind is int else numbers.Real) and not isinstance(value, bool)
    if origin in (list, tuple, Sequence):
        uniform = args and (origin is not tuple or args[-1] is Ellipsis or len(set(args)) == 1)
        return isinstance(value, (list, tuple)) and (not uniform or all(fits(item, args[0]) for item in value))
    return True


def check_model_size(name: str, input_shape: Sequence[int], num_classes: int, body: torch.nn.Module) -> None:
    """Refuse a model whose parameters would not leave room to train it in this machine's memory."""
    count = sum(tensor.numel() for tensor in body.state_dict().values())
    need, memory = count * 4, physical_memory()
    if memory and need > memory * MEMORY_SHARE:
        raise CnnkitError(f"model {name!r} for input {'x'.join(map(str, input_shape))} and {num_classes} classes "
                          f"has {count / 1e9:.2f} billion parameters ({need / 1e9:.1f} GB as float32; training "
                          f"needs about 4x that), too many for this machine's {memory / 1e9:.0f} GB of memory; "
                          "choose a smaller --image-size or --model-kwargs")


def physical_memory() -> int | None:
    """Bytes of memory on this machine, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def shapes_only():
    """A TorchFunctionMode that skips in-place value changes (initialisation) of meta tensors: they have no
    values, and PyTorch's Python versions of random init on the meta device import torch._dynamo (measured
    2-6 s, more than the rest of loading a run); skipped, a body builds on the meta device in milliseconds."""
    from torch.overrides import TorchFunctionMode

    class ShapesOnly(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name.endswith("_") and not name.startswith("__") and args and getattr(args[0], "is_meta", False):
                return args[0]
            return func(*args, **(kwargs or {}))

    return ShapesOnly()

"""Model registry: adding an architecture is one decorated builder function.

Builders take the input shape and class count from the data, so one name works for MNIST (1x28x28)
and CIFAR (3x32x32) alike, and `model.json` can rebuild a model from (name, input shape, classes, kwargs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from cnnkit.errors import CnnkitError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    description: str
    #: True: inputs are standardised with the training set's per-channel mean/std;
    #: False: pixels are only scaled to [0, 1], as the tutorial does.
    standardize: bool


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, description: str, *, standardize: bool = False) -> Callable[[Builder], Builder]:
    """Register `builder(input_shape=(C, H, W), num_classes=K, **kwargs) -> nn.Module` under `name`."""

    def decorate(builder: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} registered twice")
        _MODELS[name] = ModelEntry(name, builder, description, standardize)
        return builder

    return decorate


def list_models() -> list[ModelEntry]:
    _load_families()
    return sorted(_MODELS.values(), key=lambda entry: entry.name)


def model_names() -> list[str]:
    return [entry.name for entry in list_models()]


def get_entry(name: str) -> ModelEntry:
    _load_families()
    if name not in _MODELS:
        known = ", ".join(sorted(_MODELS))
        raise CnnkitError(f"unknown model {name!r}; known models: {known}")
    return _MODELS[name]


def _load_families() -> None:
    """Import the model family modules so their decorators run (kept lazy to avoid import cycles)."""
    from cnnkit.models import airbench, efficientnet_lite, fast, resnet, seed, timm_resnet  # noqa: F401

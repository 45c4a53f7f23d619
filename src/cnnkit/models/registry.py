"""Model registry: adding an architecture is one decorated builder function.

Builders take the input shape and class count from the data, so one name works for MNIST (1x28x28)
and CIFAR (3x32x32) alike, and `model.json` can rebuild a model from (name, input shape, classes, kwargs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from cnnkit.registry import Registry

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Builder
    description: str
    #: True: inputs are standardised with the training set's per-channel mean/std;
    #: False: pixels are only scaled to [0, 1], as the tutorial does.
    standardize: bool


#: The one name -> entry map (cnnkit.registry.Registry: its unknown-name error lists the known names and
#: suggests the closest, as for optimizers and schedules).
_MODELS: Registry[ModelEntry] = Registry("model")


def register_model(name: str, description: str, *, standardize: bool = False) -> Callable[[Builder], Builder]:
    """Register `builder(input_shape=(C, H, W), num_classes=K, **kwargs) -> nn.Module` under `name`."""

    def decorate(builder: Builder) -> Builder:
        _MODELS.register(name)(ModelEntry(name, builder, description, standardize))
        return builder

    return decorate


def list_models() -> list[ModelEntry]:
    _load_families()
    return [_MODELS.get(name) for name in sorted(_MODELS.names())]


def model_names() -> list[str]:
    return [entry.name for entry in list_models()]


def get_entry(name: str) -> ModelEntry:
    _load_families()
    return _MODELS.get(name)


def _load_families() -> None:
    """Import the model family modules so their decorators run (kept lazy to avoid import cycles)."""
    from cnnkit.models import airbench, efficientnet_lite, fast, resnet, seed, timm_resnet  # noqa: F401

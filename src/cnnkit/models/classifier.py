"""The wrapper every model trains and ships in: uint8 pixels in, class logits out.

Normalisation lives inside the model (as Keras's Rescaling layer does), with its constants saved in
the weights file, so prediction, export and serving all apply exactly what training applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnkit.errors import CnnkitError


class Rescaling(nn.Module):
    """(x - mean) / std per channel, with mean and std in pixel units (0-255); no trainable weights."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]  # exact, for model.json
        scale = 1.0 / torch.tensor(std, dtype=torch.float32)
        self.register_buffer("scale", scale.view(1, -1, 1, 1))
        self.register_buffer("offset", (-torch.tensor(mean, dtype=torch.float32) * scale).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float() * self.scale + self.offset


class ImageClassifier(nn.Module):
    """Rescaling followed by a network body; `forward` takes uint8 or float images in pixel units."""

    def __init__(self, body: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.rescale = Rescaling(mean, std)
        self.body = body
        # What build_model made it from: enough to describe it in model.json and to summarise it.
        self.architecture: str | None = None
        self.model_kwargs: dict = {}
        self.input_shape: tuple[int, int, int] | None = None
        #: A model built by a user's file (`--model FILE.py:FUNCTION`): its models.user.UserCode, else None.
        self.code = None
        #: Where the starting weights came from (`--init RUN`, `--weights FILE`), else None: random.
        self.weights_from: dict | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.rescale(images))

    def head(self) -> nn.Linear:
        """The classification head: the last nn.Linear of the body (what transfer learning replaces)."""
        return find_head(self.body)

    def head_parameters(self) -> list[nn.Parameter]:
        """The head's parameters: fit() trains them alone while the backbone is frozen, at the full rate."""
        return list(self.head().parameters())

    def summary(self, input_shape: Sequence[int] | None = None):
        """Keras's `model.summary()`: the layer table (printable; shown as the value in a notebook)."""
        from cnnkit.models.summary import summary

        return summary(self, input_shape)


@torch.no_grad()
def init_from_data(model: nn.Module, images: torch.Tensor) -> int:
    """Let layers that are set from data (e.g. airbench's patch whitening) see a sample of training images.

    Each such layer has `init_from_data(inputs)` and an `initialized` flag; it receives exactly what it
    would see in a forward pass (a pre-hook catches its input), so it works wherever the layer sits.
    Layers already initialised (a loaded or fine-tuned model) are left alone. Returns how many were set.
    """
    pending = [m for m in model.modules() if hasattr(m, "init_from_data") and m is not model
               and not bool(getattr(m, "initialized", 0))]
    if not pending:
        return 0

    remaining = set(map(id, pending))

    def initialise(module: nn.Module, inputs: tuple) -> None:
        module.init_from_data(inputs[0])
        remaining.discard(id(module))
        if not remaining:
            raise _AllInitialised  # the rest of the forward pass is not needed

    hooks = [module.register_forward_pre_hook(initialise) for module in pending]
    was_training = model.training
    try:
        model.eval()
        model(images)
    except _AllInitialised:
        pass
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return len(pending)


class _AllInitialised(Exception):
    """Stops init_from_data's forward pass once every data-initialised layer has seen its input."""


def find_head(module: nn.Module) -> nn.Linear:
    """The last nn.Linear registered in `module`: every cnnkit architecture ends with its classifier there."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise CnnkitError(f"{type(module).__name__} has no nn.Linear layer, so its head (the layer that freezing, "
                          "--backbone-lr-scale and a new head for new classes act on) cannot be found")
    return linears[-1]


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The head's parameters of any model: its own `head_parameters()` when it has one, else the last Linear's."""
    if hasattr(model, "head_parameters"):
        return list(model.head_parameters())
    return list(find_head(model).parameters())


def head_state_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of the head of `model` (e.g. body.9.weight, body.9.bias)."""
    head = find_head(model.body if isinstance(model, ImageClassifier) else model)
    name = next(name for name, module in model.named_modules() if module is head)
    return [f"{name}.{key}" for key in head.state_dict()]


def takes_pixels(model: nn.Module) -> bool:
    """Whether `model` rescales pixels itself: it holds a Rescaling (an ImageClassifier, or a wrapper of one)."""
    return any(isinstance(module, Rescaling) for module in model.modules())


def model_input(images: torch.Tensor, pixels: bool) -> torch.Tensor:
    """What a model is fed: uint8 pixels for cnnkit's models (`pixels`, see takes_pixels), which rescale
    inside; float32 pixel values (0-255) for a plain PyTorch module, as Keras casts uint8 input to float.
    A module that scales its input itself (x / 255) works either way."""
    return images if pixels or images.is_floating_point() else images.float()


def custom_architecture(model: object) -> str:
    """How model.json names an architecture given as a Python object: custom:<its class or function name>."""
    maker = type(model) if isinstance(model, nn.Module) else model
    return f"custom:{getattr(maker, '__qualname__', type(maker).__name__)}"

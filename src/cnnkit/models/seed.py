"""The tutorial's model, layer for layer (225,034 parameters on MNIST).

Keras's final softmax is folded into the loss (cross-entropy on logits), which is numerically safer
and gives the same function; `predict` applies the softmax.
"""

from __future__ import annotations

from torch import nn

from cnnkit.models.registry import register_model


def _spatial_after(size: int) -> int:
    """Valid 3x3 conv then 2x2 max-pool, twice, as in the tutorial."""
    for _ in range(2):
        size = (size - 2) // 2
    return size


@register_model("seed", "The tutorial's CNN: Conv32-Pool-Conv64-Pool-Dense128-Dense (Keras defaults)")
def seed_cnn(input_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    channels, height, width = input_shape
    flat = 64 * _spatial_after(height) * _spatial_after(width)
    model = nn.Sequential(
        nn.Conv2d(channels, 32, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )
    _keras_init(model)
    return model


def _keras_init(model: nn.Module) -> None:
    """Keras defaults (Glorot-uniform weights, zero biases), so the seed recipe learns like the tutorial."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)

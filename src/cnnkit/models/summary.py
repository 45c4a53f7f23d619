"""A Keras-style `model.summary()`: each layer with its output shape and parameter count."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int


def _leaf_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if not list(module.children())]


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerRow]:
    """Run one dummy image through the model and record every leaf layer's output shape."""
    rows: list[LayerRow] = []
    hooks = []
    for name, module in _leaf_modules(model):
        def record(mod, _inputs, output, name=name):
            shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else ()
            rows.append(LayerRow(name, type(mod).__name__, shape, sum(p.numel() for p in mod.parameters())))
        hooks.append(module.register_forward_hook(record))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), dtype=torch.uint8))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return rows


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def summary_table(model: nn.Module, input_shape: tuple[int, int, int], title: str = "Model"):
    """A rich Table like Keras's summary, with the totals in its caption."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("Layer (type)")
    table.add_column("Output Shape")
    table.add_column("Param #", justify="right")
    for row in summarize(model, input_shape):
        table.add_row(f"{row.name} ({row.kind})", str((None, *row.output_shape)), f"{row.params:,}")
    total, trainable = count_parameters(model)
    table.caption = f"Total params: {total:,}  Trainable params: {trainable:,}  Non-trainable params: {total - trainable:,}"
    return table

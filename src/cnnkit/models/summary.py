"""A Keras-style `model.summary()`: each layer with its output shape and parameter count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cnnkit.errors import CnnkitError


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
            model(torch.zeros((1, *input_shape)))  # float: ImageClassifier takes it too, a bare module needs it
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
    """A rich Table like Keras's summary, with the totals in its caption (what `cnnkit summary` prints)."""
    return summary_table_from(summary(model, input_shape, title))


@dataclass
class ModelSummary:
    """The table of `cnnkit.summary(model)`: its str is the table, so print() and a REPL both show it."""

    rows: list[LayerRow]
    total: int
    trainable: int
    input_shape: tuple[int, int, int]
    title: str

    def __str__(self) -> str:
        from rich.console import Console

        table = summary_table_from(self)
        console = Console(width=100, record=True, file=_Discard())
        console.print(table)
        return console.export_text().rstrip() + "\n"

    __repr__ = __str__


class _Discard:
    """A file that drops writes: the console records what it renders, nothing is printed twice."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def summary(model: nn.Module, input_shape: Sequence[int] | None = None, title: str = "Model") -> ModelSummary:
    """Layers, output shapes and parameter counts of `model` for one input of `input_shape` (C, H, W).

    `input_shape` defaults to the shape the model was built for (models from `cnnkit.build_model`).
    """
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is None:
        raise CnnkitError("summary() needs input_shape (C, H, W) for a model not made by cnnkit.build_model")
    shape = tuple(int(v) for v in shape)
    total, trainable = count_parameters(model)
    name = getattr(model, "architecture", None)
    return ModelSummary(summarize(model, shape), total, trainable, shape,
                        title if title != "Model" or name is None else f"{name} (input {shape})")


def summary_table_from(result: ModelSummary):
    """The rich Table of a ModelSummary, with Keras's totals in its caption."""
    from rich.table import Table

    table = Table(title=result.title)
    table.add_column("Layer (type)")
    table.add_column("Output Shape")
    table.add_column("Param #", justify="right")
    for row in result.rows:
        table.add_row(f"{row.name} ({row.kind})", str((None, *row.output_shape)), f"{row.params:,}")
    table.caption = (f"Total params: {result.total:,}  Trainable params: {result.trainable:,}  "
                     f"Non-trainable params: {result.total - result.trainable:,}")
    return table

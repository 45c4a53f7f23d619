"""Train only the head for the first N epochs, then everything: the usual start of fine-tuning.

A new head starts random; its first gradients are large and meaningless for the pretrained layers
below it, and passing them back would disturb what those layers learned. Freezing the backbone
(`requires_grad` off: no gradients are computed for it, no optimizer step, no weight decay) until the
head has settled avoids that. BatchNorm running statistics still follow the new data while frozen:
they are statistics, not learned weights, and matching them to the new images helps.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cnnkit.engine.callbacks.base import Callback, Phase
from cnnkit.models.classifier import head_parameters


class FreezeBackbone(Callback):
    """requires_grad False on every parameter but the head's for epochs 1..`epochs`; restored afterwards."""

    order = Phase.PREPARE  # before anything else looks at the model at the start of an epoch

    def __init__(self, epochs: int) -> None:
        if epochs < 0:
            raise ValueError(f"FreezeBackbone needs epochs >= 0, got {epochs}")
        self.epochs = epochs
        self._frozen: list[nn.Parameter] = []

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        if self.state.initial_epoch >= self.epochs:  # none, or a resumed run already past the frozen epochs
            return
        head = {id(parameter) for parameter in head_parameters(self.model)}
        # Only those that train now: a layer frozen by design (airbench's whitening) stays frozen after.
        self._frozen = [p for p in self.model.parameters() if id(p) not in head and p.requires_grad]
        for parameter in self._frozen:
            parameter.requires_grad_(False)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if epoch > self.epochs:
            self.unfreeze()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.unfreeze()

    def close(self) -> None:
        self.unfreeze()  # also when training stopped with an exception: the model is left trainable

    def unfreeze(self) -> None:
        for parameter in self._frozen:
            parameter.requires_grad_(True)
        self._frozen = []

    @property
    def frozen(self) -> bool:
        return bool(self._frozen)

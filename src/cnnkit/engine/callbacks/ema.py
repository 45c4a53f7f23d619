"""An exponential moving average of the weights, scored on validation beside the raw weights.

Averaging the weights of the last few hundred steps smooths the noise of the final steps (the CIFAR speed
runs and timm keep one for that reason). The average is updated after every step with one fused
`lerp` over all tensors; BatchNorm running statistics are averaged too, integer buffers copied.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from cnnkit.engine.callbacks.base import Callback, Phase, StateDict
from cnnkit.engine.logs import EMA_WEIGHTS, logs_key


def ema_decay(decay: float, updates: int) -> float:
    """TensorFlow's ExponentialMovingAverage warm-up: min(decay, (1 + n) / (10 + n)) at the n-th update.

    Without it, an average with decay 0.999 would still be mostly the random initial weights after the
    469 steps of a one-epoch MNIST run.
    """
    return min(decay, (1 + updates) / (10 + updates))


class EMA(Callback):
    order = Phase.MEASURE  # adds ema_val_loss / ema_val_accuracy to the logs before anything reads them

    def __init__(self, decay: float = 0.999) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.updates = 0
        self.average: torch.nn.Module | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.average = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.updates = 0
        live = self.model.state_dict(keep_vars=True)
        averaged = self.average.state_dict(keep_vars=True)
        floats = [key for key, tensor in live.items() if tensor.is_floating_point()]
        self._live = [live[key].detach() for key in floats]
        self._averaged = [averaged[key] for key in floats]
        self._copied = [(averaged[key], live[key]) for key in live if key not in floats]
        self.state.weight_sources[EMA_WEIGHTS] = self.averaged_weights

    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "average": self.averaged_weights()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.average is not None, "on_train_begin comes first"
        self.updates = int(state["updates"])
        self.average.load_state_dict(state["average"])

    def averaged_weights(self) -> StateDict:
        assert self.average is not None
        return self.average.state_dict()

    @torch.no_grad()
    def on_batch_end(self, batch: int, logs=None) -> None:
        self.updates += 1
        torch._foreach_lerp_(self._averaged, self._live, 1.0 - ema_decay(self.decay, self.updates))
        for target, source in self._copied:
            target.copy_(source)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        loss, accuracy = self.state.score(self.average)
        logs[logs_key(EMA_WEIGHTS, "val_loss")], logs[logs_key(EMA_WEIGHTS, "val_accuracy")] = loss, accuracy

"""Which weights a run ends with: the best validation epoch's or the last's, raw or averaged (EMA).

Every weight source (the model itself, "raw"; EMA adds "ema") is scored on validation each epoch; with
keep="best" the best (epoch, source) over the whole run is snapshotted and restored at the end, with
keep="last" the better source of the last epoch is. Only validation decides: never the test set.
"""

from __future__ import annotations

from typing import Any

from cnnkit.engine.callbacks.base import Callback, Phase, StateDict, is_better, mode_for, monitored
from cnnkit.engine.logs import KEEP_RULES, RAW_WEIGHTS, Selection, logs_key


class WeightSelection(Callback):
    order = Phase.SELECT

    def __init__(self, monitor: str = "val_accuracy", keep: str = "best") -> None:
        if keep not in KEEP_RULES:
            raise ValueError(f"keep must be 'best' or 'last', got {keep!r}")
        self.monitor, self.keep, self.mode = monitor, keep, mode_for(monitor)
        self.best: float | None = None
        self.choice: Selection | None = None
        self.snapshot: StateDict | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.best, self.choice, self.snapshot = None, None, None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if self.keep == "last":
            self.best = None  # only the final epoch's sources compete
        for source, weights in self.state.weight_sources.items():
            value = monitored(logs, logs_key(source, self.monitor), "weight selection")
            if is_better(value, self.best, self.mode):
                self.best = value
                self.choice = Selection(self.keep, epoch, source, self.monitor, value)
                if self.keep == "best":
                    self.snapshot = {key: tensor.detach().clone() for key, tensor in weights().items()}

    def state_dict(self) -> dict[str, Any]:
        choice = None if self.choice is None else self.choice.to_dict()
        return {"best": self.best, "choice": choice, "snapshot": self.snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        choice = state["choice"]
        self.best, self.snapshot = state["best"], state["snapshot"]
        self.choice = None if choice is None else Selection.from_dict(choice)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        if self.choice is None:
            return
        weights = self.snapshot
        if self.keep == "last" and self.choice.weights != RAW_WEIGHTS:
            weights = self.state.weight_sources[self.choice.weights]()
        if weights is not None:
            self.state.model.load_state_dict(weights)
        self.snapshot = None
        self.state.selected = self.choice

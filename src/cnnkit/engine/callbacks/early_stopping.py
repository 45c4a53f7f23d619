"""Stop training when the monitored validation value has not improved for `patience` epochs."""

from __future__ import annotations

from typing import Any

from cnnkit.engine.callbacks.base import Callback, Phase, is_better, mode_for, monitored


class EarlyStopping(Callback):
    """Keras's EarlyStopping: counts epochs without a strictly better value, then sets stop_training.

    It only stops; which weights the run keeps is WeightSelection's job (`--keep best` restores the best).
    """

    order = Phase.DECIDE

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0) -> None:
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.mode = mode_for(monitor)
        self.best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.best, self.wait, self.stopped_epoch = None, 0, None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.wait, self.stopped_epoch = state["best"], int(state["wait"]), state["stopped_epoch"]

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        value = monitored(logs, self.monitor, "EarlyStopping")
        if is_better(value, self.best, self.mode, self.min_delta):
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            self.state.stop_training = True
            self.stopped_epoch = epoch

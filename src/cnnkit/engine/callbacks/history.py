"""Per-epoch training record with Keras's shape: `history.history["val_accuracy"]` is a list per epoch.

History is the callback that records every key of every epoch's logs, so a value a callback adds (EMA's
`ema_val_accuracy`) reaches `history.history` and `history.csv` with no change here.
"""

from __future__ import annotations

import math
from typing import Any

from cnnkit.engine.callbacks.base import Callback, Phase
from cnnkit.engine.logs import Selection


#: Per-step points recorded per epoch: enough for a smooth curve of a one-epoch run, few enough to be free.
STEP_POINTS_PER_EPOCH = 50
STEP_KEYS = ("step", "epoch", "loss", "accuracy")


class History(Callback):
    """The History fit() returns: `history[key]` per epoch, `epoch` numbers, and the weights kept.

    `steps` holds the running training loss/accuracy at ~50 points per epoch (step, fractional epoch), so
    a run of one or two epochs still has a learning curve. The points are copied on the device and read
    once per epoch: recording them adds no per-step sync.
    """

    order = Phase.RECORD  # after every callback that adds to the logs; before the progress line prints them

    def __init__(self) -> None:
        self.history: dict[str, list[float]] = {}
        self.epoch: list[int] = []
        self.steps: dict[str, list[float]] = {key: [] for key in STEP_KEYS}
        self.selected: Selection | None = None
        self._pending: list[tuple[int, float, Any, int]] = []

    def on_batch_end(self, batch: int, logs=None) -> None:
        per_epoch = self.state.steps_per_epoch
        every = max(1, per_epoch // STEP_POINTS_PER_EPOCH)
        if (batch + 1) % every == 0 or batch + 1 == per_epoch:
            sums, seen = logs.snapshot()
            self._pending.append((self.state.step, self.state.epoch - 1 + (batch + 1) / per_epoch, sums, seen))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        # Timed here, after the callbacks that evaluate (EMA), so their cost counts as training time.
        logs["seconds"] = self.state.seconds_in_epoch()
        self.append(epoch, **logs)
        self._record_steps()

    def _record_steps(self) -> None:
        if not self._pending:
            return
        import torch

        sums = torch.stack([sums for *_, sums, _ in self._pending]).cpu().tolist()  # one sync per epoch
        for (step, fraction, _, seen), (loss_sum, correct) in zip(self._pending, sums):
            for key, value in zip(STEP_KEYS, (step, fraction, loss_sum / seen, correct / seen)):
                self.steps[key].append(value)
        self._pending = []

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.selected = self.state.selected

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "epoch": self.epoch, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {key: [float(v) for v in values] for key, values in state["history"].items()}
        self.epoch = [int(epoch) for epoch in state["epoch"]]
        self.steps = {key: list(state["steps"].get(key, [])) for key in STEP_KEYS}

    def append(self, epoch: int, **values: float) -> None:
        """Add one epoch; a key first seen now is NaN for earlier epochs, a missing key NaN for this one."""
        for key in values:
            self.history.setdefault(key, [math.nan] * len(self.epoch))
        self.epoch.append(epoch)
        for key, series in self.history.items():
            series.append(float(values.get(key, math.nan)))

    @property
    def train_seconds(self) -> float:
        return float(sum(self.history.get("seconds", [])))

    def first_epoch_reaching(self, key: str, threshold: float) -> int | None:
        """1-based epoch at which `key` first reached `threshold`, or None."""
        for epoch, value in zip(self.epoch, self.history.get(key, [])):
            if value >= threshold:
                return epoch
        return None

    def seconds_until(self, key: str, threshold: float) -> float | None:
        """Training seconds spent until the end of the epoch where `key` first reached `threshold`."""
        epoch = self.first_epoch_reaching(key, threshold)
        if epoch is None:
            return None
        return float(sum(self.history["seconds"][: self.epoch.index(epoch) + 1]))

    def to_csv(self) -> str:
        keys = list(self.history)
        lines = [",".join(("epoch", *keys))]
        for i, epoch in enumerate(self.epoch):
            lines.append(",".join([str(epoch)] + [repr(self.history[key][i]) for key in keys]))
        return "\n".join(lines) + "\n"

    def steps_to_csv(self) -> str:
        rows = zip(*(self.steps[key] for key in STEP_KEYS))
        return "\n".join([",".join(STEP_KEYS), *(",".join(map(repr, row)) for row in rows)]) + "\n"

    def __repr__(self) -> str:
        if not self.epoch:
            return "History(no epochs)"
        best = max(range(len(self.epoch)), key=lambda i: self.history["val_accuracy"][i]) \
            if "val_accuracy" in self.history else None
        text = f"History({len(self.epoch)} epochs"
        if best is not None:
            text += f", best val_accuracy {self.history['val_accuracy'][best]:.4f} at epoch {self.epoch[best]}"
        if self.selected:
            text += f", kept epoch {self.selected.epoch} ({self.selected.weights} weights)"
        return text + f"; keys: {', '.join(self.history)})"

    @classmethod
    def from_csv(cls, text: str) -> History:
        rows = [line.split(",") for line in text.strip().splitlines()]
        header, body = rows[0], rows[1:]
        history = cls()
        for row in body:
            values = dict(zip(header, row))
            epoch = int(values.pop("epoch"))
            history.append(epoch, **{key: float(value) for key, value in values.items()})
        return history

"""Per-epoch training record with Keras's shape: `history.history["val_accuracy"]` is a list per epoch."""

from __future__ import annotations

from dataclasses import dataclass, field

HISTORY_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds")


@dataclass
class History:
    history: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key in HISTORY_KEYS})
    epoch: list[int] = field(default_factory=list)

    def append(self, epoch: int, **values: float) -> None:
        self.epoch.append(epoch)
        for key in HISTORY_KEYS:
            self.history[key].append(float(values[key]))

    @property
    def train_seconds(self) -> float:
        return float(sum(self.history["seconds"]))

    def first_epoch_reaching(self, key: str, threshold: float) -> int | None:
        """1-based epoch at which `key` first reached `threshold`, or None."""
        for epoch, value in zip(self.epoch, self.history[key]):
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
        lines = [",".join(("epoch", *HISTORY_KEYS))]
        for i, epoch in enumerate(self.epoch):
            lines.append(",".join([str(epoch)] + [repr(self.history[key][i]) for key in HISTORY_KEYS]))
        return "\n".join(lines) + "\n"

    @classmethod
    def from_csv(cls, text: str) -> History:
        rows = [line.split(",") for line in text.strip().splitlines()]
        header, body = rows[0], rows[1:]
        history = cls()
        for row in body:
            values = dict(zip(header, row))
            history.append(int(values["epoch"]), **{key: float(values[key]) for key in HISTORY_KEYS})
        return history

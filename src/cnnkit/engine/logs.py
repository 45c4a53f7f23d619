"""The names fit() logs its epochs under, and the record of which weights a run kept.

Two contracts that several modules share (the selection callback, EMA, History, the plots, the summary and
metrics.json) are written once here instead of as string keys spelled in each: a weight source's logs key
(`logs_key("ema", "val_accuracy")` is "ema_val_accuracy") and `Selection`. Importing this module costs
nothing (no torch), so the plots and the CLI's summary can use it too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

RAW_WEIGHTS = "raw"  # the weight source that is the model itself
EMA_WEIGHTS = "ema"  # the exponential moving average of the model's weights (engine/callbacks/ema.py)
KEEP_RULES = ("best", "last")


def logs_key(source: str, name: str) -> str:
    """The logs (and history.csv) key of `name` for a weight source: val_accuracy for raw, ema_val_accuracy
    for ema."""
    return name if source == RAW_WEIGHTS else f"{source}_{name}"


@dataclass(frozen=True)
class Selection:
    """Which weights a run kept: the epoch, the weight source, and the rule and value that chose them."""

    keep: str  # "best" or "last"
    epoch: int  # 1-based
    weights: str  # a weight source: RAW_WEIGHTS or EMA_WEIGHTS
    monitor: str  # the logs key the rule compared, e.g. "val_accuracy"
    value: float

    def key(self, name: str) -> str:
        """The logs key of `name` for the kept weights (ema_val_accuracy when EMA weights were kept)."""
        return logs_key(self.weights, name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Any) -> Selection:
        """A Selection from its to_dict() (a checkpoint's state); ValueError naming what is wrong."""
        if not isinstance(value, dict) or set(value) != {"keep", "epoch", "weights", "monitor", "value"}:
            raise ValueError(f"a weight selection must have keep, epoch, weights, monitor and value, got "
                             f"{value!r}"[:200])
        keep, epoch, weights, monitor, number = (value[key] for key in ("keep", "epoch", "weights", "monitor", "value"))
        if keep not in KEEP_RULES or type(epoch) is not int or epoch < 1 or not isinstance(weights, str) \
                or not isinstance(monitor, str) or isinstance(number, bool) or not isinstance(number, (int, float)) \
                or math.isnan(number):
            raise ValueError(f"a weight selection holds a value of the wrong kind: {value!r}"[:200])
        return cls(keep, epoch, weights, monitor, float(number))

"""A time budget: after the first epoch, cut the run's epoch count to what fits in the seconds it was given.

A recipe tuned on one machine runs far slower on another (hosts of one kind differ in instruction sets and from
day to day; benchmarks/RESULTS.md has the figures), so a preset that promises "15 minutes" cannot be a fixed
epoch count. Timing the first epoch (training and validation) and planning the rest once keeps the
schedule a pure function of the step: the learning-rate curve is
re-drawn over the new length at that point, never again, so the run is as reproducible as a plain
`--epochs N` run of the chosen N (which the run records). Planning again later would bend the decay
mid-way; a machine that slows down after the first epoch overruns instead, by what it slowed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from cnnkit.engine.distributed import all_reduce_sum, current_world
from cnnkit.engine.callbacks.base import Callback, Phase


def epochs_that_fit(budget: float, spent: float, epoch: int, epoch_seconds: float, most: int) -> int:
    """Epochs in all (at least the `epoch` already done, at most `most`) when each takes `epoch_seconds`
    and `spent` of the `budget` seconds are gone after epoch `epoch`."""
    more = math.floor(max(0.0, budget - spent) / epoch_seconds) if epoch_seconds > 0 else most
    return max(epoch, min(most, epoch + more))


class TimeBudget(Callback):
    """Sets `state.epochs` (the schedule's length and the loop's end) after the first epoch of the run."""

    order = Phase.PLAN  # after the callbacks that evaluate (EMA) so their cost is timed; before the checkpoint saves it

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"TimeBudget needs seconds > 0, got {seconds}")
        self.seconds = float(seconds)
        self.planned: int | None = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.planned = None

    def state_dict(self) -> dict[str, Any]:
        return {"planned": self.planned}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.planned = state["planned"]
        if self.planned is not None:
            self.state.epochs = int(self.planned)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if self.planned is not None:
            return
        seconds = self.agreed_seconds(self.state.seconds_in_epoch())
        # Epoch 1 of a run (a callback added to a resumed run plans at its first epoch, at that epoch's pace).
        self.planned = epochs_that_fit(self.seconds, seconds * epoch, epoch, seconds, self.state.epochs)
        self.state.epochs = self.planned  # the progress line's "Epoch 1/N" shows the new N

    def agreed_seconds(self, seconds: float) -> float:
        """The ranks' mean epoch time, so that data-parallel processes plan the same epoch count."""
        world = current_world()
        if not world.distributed:
            return seconds
        value = torch.tensor([seconds], dtype=torch.float64, device=self.state.device)  # NCCL wants CUDA
        return float(all_reduce_sum(value, world).item()) / world.world_size

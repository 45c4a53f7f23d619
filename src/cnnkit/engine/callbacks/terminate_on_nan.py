"""Stop training as soon as the loss is NaN or infinite (Keras's TerminateOnNaN), before anything records it.

A diverged model is not a result: its NaN history must not be written, its weights not checkpointed or
saved. This callback runs before weight selection, History and the checkpoint (order 5), so the bad
epoch reaches none of them and the last checkpoint on disk stays the last good epoch's.

How it looks without a device sync per step: the epoch's running loss sum (BatchLogs.loss_sum, on the
device) stays non-finite once any step's loss was (NaN + x is NaN, inf + finite is inf, and a loss is
never negative), so looking at it every CHECK_EVERY steps misses no bad step. To still name the exact
step, each step adds isfinite(sum) to a counter on the device (two tiny kernels, no sync); at a check
the counter is the number of good steps of the epoch. A check is one sync per CHECK_EVERY steps: at
most that many steps are wasted after a divergence, and on a GPU the queue drains once per 100 steps
instead of every step. At the end of each epoch every figure of the logs (training and validation, EMA's)
is checked too: they are host floats by then, so that costs nothing, and it catches weights that went
bad in the last step or a validation loss that overflows while the training loss did not.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch

from cnnkit.engine.distributed import all_reduce_min, current_world
from cnnkit.engine.callbacks.base import Callback, Phase
from cnnkit.errors import TrainingDiverged

#: Steps between two looks at the running loss: one device sync per this many steps.
CHECK_EVERY = 100

ADVICE = "lower the learning rate (--lr), or train in fp32 (--precision fp32)"


class TerminateOnNaN(Callback):
    """Raise TrainingDiverged naming the epoch and step where the loss first became NaN or infinite."""

    order = Phase.GUARD  # after EMA (Phase.MEASURE) has added its figures; before early stopping, selection, History, checkpoint

    def __init__(self, check_every: int = CHECK_EVERY) -> None:
        if check_every < 1:
            raise ValueError(f"TerminateOnNaN needs check_every >= 1, got {check_every}")
        self.check_every = check_every
        self._good_steps: torch.Tensor | None = None
        self._epoch_start = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._good_steps, self._epoch_start = None, self.state.step

    def on_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None:
        running = getattr(logs, "loss_sum", None)
        if not isinstance(running, torch.Tensor):  # a caller's own logs: checked at the epoch's end only
            return
        if self._good_steps is None:
            self._good_steps = torch.zeros((), dtype=torch.long, device=running.device)
        self._good_steps.add_(torch.isfinite(running))
        if (batch + 1) % self.check_every == 0:
            self._check_steps()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        if self._good_steps is not None:
            self._check_steps()
        bad = {key: value for key, value in logs.items() if _not_finite(value)}
        if bad:
            key, value = next(iter(bad.items()))
            raise TrainingDiverged(f"training diverged: {_describe(key)} is {value} after epoch {epoch} (step "
                                   f"{self.state.step}); nothing of that epoch is kept: {ADVICE}")

    def _check_steps(self) -> None:
        """Raise if a step of this epoch so far had a non-finite loss (every rank's steps, data-parallel)."""
        good = int(_least_over_ranks(self._good_steps))
        done = self.state.step - self._epoch_start
        if good >= done:
            return
        step, batch = self._epoch_start + good + 1, good + 1
        raise TrainingDiverged(f"training diverged: the training loss became NaN or infinite at step {step} "
                               f"(epoch {self.state.epoch}, batch {batch} of {self.state.steps_per_epoch}); "
                               f"nothing of that epoch is kept: {ADVICE}")


def _least_over_ranks(value: torch.Tensor) -> int:
    """`value` on one process; its minimum over all processes under torchrun, so every rank stops together."""
    return int(all_reduce_min(value.clone(), current_world()).item())


def _not_finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isfinite(value)


def _describe(key: str) -> str:
    names = {"loss": "the training loss", "val_loss": "the validation loss", "accuracy": "the training accuracy",
             "val_accuracy": "the validation accuracy"}
    return names.get(key, key)

"""The callback seam: what fit() calls around each step and epoch, and the state callbacks may read.

The hooks and their order are Keras's (`on_train_begin`, `on_epoch_begin`, `on_batch_end`,
`on_epoch_end(epoch, logs)`, `on_train_end`), so a feature such as early stopping, EMA or a checkpoint is
one callback class instead of one more `if` in the loop. `logs` is a plain dict that callbacks may add to
(EMA adds `ema_val_accuracy`); History records whatever it holds.
"""

from __future__ import annotations

import math
import time
from enum import IntEnum
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnkit.data.tensors import Split
from cnnkit.engine.logs import Selection
from cnnkit.errors import CnnkitError
from cnnkit.engine.distributed import all_reduce_sum
from cnnkit.engine.evaluate import loss_and_accuracy

StateDict = dict[str, torch.Tensor]


@dataclass
class TrainState:
    """What fit() exposes to callbacks while it runs; `stop_training` is the one field they set."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    val: Split
    device: torch.device
    epochs: int
    steps_per_epoch: int
    eval_batch_size: int = 1000
    epoch: int = 0
    step: int = 0  # optimizer steps taken so far, across epochs
    epoch_started: float = 0.0  # time.perf_counter() at the start of the current epoch
    stop_training: bool = False
    #: Weights a run could end with, by name (logs.RAW is the model itself; EMA adds logs.EMA). Their logs
    #: keys are logs.logs_key(source, name).
    weight_sources: dict[str, Callable[[], StateDict]] = field(default_factory=dict)
    #: Which weights the model holds after training, set by WeightSelection (epoch, weights, monitor, value).
    selected: Selection | None = None
    #: Epochs already done before this fit() call began: 0, or the epoch a resumed run's checkpoint was at.
    initial_epoch: int = 0
    #: The generator of shuffling and augmentation (its state is part of a checkpoint).
    generator: torch.Generator | None = None
    #: Every callback of this fit() in hook order, set by CallbackList (a checkpoint saves each one's state).
    callbacks: list[Callback] = field(default_factory=list)
    #: (loss, accuracy) of a model on the validation split (over all ranks when data-parallel); None: `val`.
    score: Callable[[nn.Module], tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        if self.score is None:
            val, batch_size = self.val, self.eval_batch_size
            self.score = lambda model: loss_and_accuracy(model, val, batch_size=batch_size)

    def begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.epoch_started = time.perf_counter()

    def seconds_in_epoch(self) -> float:
        """Wall time since the epoch began, after waiting for queued GPU work (CPU work is synchronous)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.epoch_started


class Phase(IntEnum):
    """Where a callback runs within each hook; callbacks run in this order (ties: in the order given).

    prepare -> measure -> guard -> decide -> select -> user -> plan -> record -> save -> report: a callback that
    changes the model for the epoch runs first; the ones that add figures to `logs` (EMA) before any that read
    them; a NaN stops the run before anything decides on it; a user's callback sees every figure of the epoch
    (but `seconds`, which History adds as it records: `self.state.seconds_in_epoch()` has it) and what it adds
    is recorded; the checkpoint saves what all of them did; the progress line prints last.
    `cnnkit.engine.callbacks.show_order(callbacks)` prints a fit()'s order.
    """

    PREPARE = -20  # change the model for the coming epoch (FreezeBackbone)
    MEASURE = -10  # add figures to the logs (EMA's ema_val_loss / ema_val_accuracy)
    GUARD = 5  # refuse a broken epoch (TerminateOnNaN)
    DECIDE = 10  # decide from the logs whether to go on (EarlyStopping)
    SELECT = 20  # choose the weights to keep (WeightSelection)
    USER = 50  # a user's callback, unless it says otherwise: the epoch's figures are in the logs
    PLAN = 80  # re-plan the run from the epoch's cost (TimeBudget: after the evaluating callbacks are timed)
    RECORD = 90  # record the epoch (History: adds `seconds`)
    SAVE = 95  # write what the epoch did (Checkpoint, TensorBoard)
    REPORT = 100  # print it (the progress line)


class Callback:
    """Base class: override the hooks you need. `self.state` (and `self.model`) are set before training.

    `order` (a Phase, or any number) sorts callbacks within each hook; a user's callback runs at Phase.USER
    unless it sets another: after the guard against NaN and the weight selection, before History records.
    """

    order: int = Phase.USER
    state: TrainState

    def set_state(self, state: TrainState) -> None:
        self.state = state

    @property
    def model(self) -> nn.Module:
        return self.state.model

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None: ...

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None: ...

    def on_batch_end(self, batch: int, logs: Mapping[str, float] | None = None) -> None:
        """After each optimizer step. `logs` computes the running loss/accuracy only when read (a device sync)."""

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None: ...

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None: ...

    def close(self) -> None:
        """Release what the callback holds (a live display), whether or not training finished."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this callback exactly (counters, best values, tensors).

        Plain values and tensors only, nested in dicts and lists: a checkpoint stores them as JSON and
        safetensors. A stateless callback keeps the default, {}.
        """
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what state_dict() returned; called after on_train_begin of a resumed fit()."""


def show_order(callbacks: Iterable[Callback]) -> str:
    """The order fit() calls `callbacks` in, one per line with its phase (fastai's show_training_loop)."""
    rows = []
    for callback in sorted(callbacks, key=lambda callback: callback.order):
        phase = next((p.name.lower() for p in Phase if p == callback.order), f"{callback.order}")
        rows.append(f"{int(callback.order):>5}  {phase:<8} {type(callback).__name__}")
    return "\n".join(rows)


class CallbackList:
    """Calls each hook on every callback in `order`; on_batch_end only on those that override it."""

    def __init__(self, callbacks: Iterable[Callback], state: TrainState) -> None:
        self.callbacks = sorted(callbacks, key=lambda callback: callback.order)
        for callback in self.callbacks:
            callback.set_state(state)
        state.callbacks = self.callbacks
        self._per_step = [c for c in self.callbacks if type(c).on_batch_end is not Callback.on_batch_end]

    def on_train_begin(self) -> None:
        for callback in self.callbacks:
            callback.on_train_begin({})

    def on_epoch_begin(self, epoch: int) -> None:
        for callback in self.callbacks:
            callback.on_epoch_begin(epoch, {})

    def on_batch_end(self, batch: int, logs: Mapping[str, float]) -> None:
        for callback in self._per_step:
            callback.on_batch_end(batch, logs)

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict[str, Any]) -> None:
        for callback in self.callbacks:
            callback.on_train_end(logs)

    def __enter__(self) -> CallbackList:
        return self

    def __exit__(self, *exc: object) -> None:
        for callback in self.callbacks:
            callback.close()


def mode_for(monitor: str) -> str:
    """'max' for accuracies, 'min' for losses (Keras's 'auto' mode)."""
    return "max" if "acc" in monitor else "min"


def is_better(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Strictly better than `best` by more than `min_delta`; NaN is never better; ties keep the earlier."""
    if math.isnan(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def monitored(logs: Mapping[str, Any], key: str, who: str) -> float:
    if key not in logs:
        raise CnnkitError(f"{who} monitors {key!r}, which the epoch's logs lack (they have: {', '.join(logs)})")
    return float(logs[key])


class BatchLogs(Mapping):
    """The epoch's running training loss and accuracy, summed on the device: the `logs` of on_batch_end.

    Read as a mapping ({"loss", "accuracy"}) it syncs with the device only when a value is looked up, so
    callbacks that do not look (all but a throttled progress bar) add no per-step sync; `snapshot()`
    copies the sums on the device for reading later, without a sync at all.
    """

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = 0

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum.add_(loss.detach(), alpha=len(labels))
        self.correct.add_((logits.detach().argmax(1) == labels).sum())
        self.seen += len(labels)

    def snapshot(self) -> tuple[torch.Tensor, int]:
        """(loss_sum, correct) stacked as one device tensor, and the count: means = values / count."""
        return torch.stack([self.loss_sum, self.correct.to(self.loss_sum.dtype)]), self.seen

    def result(self, world: Any = None) -> dict[str, float]:
        """The epoch's mean loss and accuracy; over every rank's images when `world` is data-parallel."""
        if world is None or not world.distributed:
            return {"loss": self["loss"], "accuracy": self["accuracy"]}

        sums = torch.stack([self.loss_sum.double(), self.correct.double(),
                            torch.tensor(float(self.seen), dtype=torch.float64, device=self.loss_sum.device)])
        loss_sum, correct, seen = all_reduce_sum(sums, world).tolist()
        return {"loss": loss_sum / max(1.0, seen), "accuracy": correct / max(1.0, seen)}

    def __getitem__(self, key: str) -> float:
        if key == "loss":
            return self.loss_sum.item() / max(1, self.seen)
        if key == "accuracy":
            return self.correct.item() / max(1, self.seen)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(("loss", "accuracy"))

    def __len__(self) -> int:
        return 2

"""TensorBoard logging: every value of every epoch's logs, as a scalar at that epoch.

`cnnkit train --tensorboard` adds it with the run's `tensorboard/` folder as `log_dir`, so
`tensorboard --logdir runs` shows each run under its own name. tensorboard is an optional extra
(`pip install "cnnkit[tensorboard]"`), imported only when a logger is made.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path
from typing import Any

from cnnkit.engine.callbacks.base import Callback, Phase
from cnnkit.errors import CnnkitError

INSTALL_HINT = 'pip install "cnnkit[tensorboard]"'


class TensorBoardLogger(Callback):
    """Write each epoch's logs (loss, accuracy, val_loss, val_accuracy, lr, seconds, ema_*, ...) to `log_dir`.

    It runs after History (Phase.RECORD), so it sees every value the other callbacks added, History's
    `seconds` among them. The event file is flushed every epoch, so a live TensorBoard follows training.
    """

    order = Phase.SAVE

    def __init__(self, log_dir: str | Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise CnnkitError(f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}") from None
        self.log_dir = Path(log_dir)
        self._writer_class = SummaryWriter
        self.writer = None

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self.writer = self._writer_class(log_dir=str(self.log_dir))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        for key, value in logs.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(key, float(value), global_step=epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

"""Write a resumable checkpoint after every epoch, so a crash, Ctrl-C, SIGTERM or kill -9 loses at most one.

The checkpoint (engine/checkpoint.py) holds the weights, the optimizer, every callback's state, the RNG
states and `meta` (what the caller needs to rebuild the run: its config and a fingerprint of its data);
`cnnkit train --resume` continues from it and ends with the weights an uninterrupted run would have.
Writing costs one safetensors file of three to four times the weights (weights, optimizer moments, the
kept best weights) per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cnnkit.engine.callbacks.base import Callback
from cnnkit.engine.checkpoint import capture_training, write_checkpoint


class Checkpoint(Callback):
    order = 95  # after History (90) has recorded the epoch, so the checkpoint's history includes it

    def __init__(self, directory: str | Path, meta: dict[str, Any] | None = None) -> None:
        self.directory = Path(directory)
        self.meta = meta or {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        write_checkpoint(self.directory, capture_training(self.state, self.meta))

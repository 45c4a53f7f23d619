"""Write a resumable checkpoint after every epoch, so a crash, Ctrl-C, SIGTERM or kill -9 loses at most one.

The checkpoint (engine/checkpoint.py) holds the weights, the optimizer, every callback's state, the RNG
states and `meta` (what the caller needs to rebuild the run: its config and a fingerprint of its data);
`cnnkit train --resume` continues from it and ends with the weights an uninterrupted run would have.
Writing costs one safetensors file of three to four times the weights (weights, optimizer moments, the
kept best weights) per epoch.

A checkpoint is a safety net, not the result: when the disk refuses one (full, read-only), training goes
on with the previous checkpoint kept, and says so; the finished run is then written, or rescued
elsewhere, at the end (api.write_or_rescue).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cnnkit.engine.callbacks.base import Callback, Phase
from cnnkit.engine.checkpoint import (CHECKPOINT_JSON, capture_training, checkpoint_epoch, read_checkpoint_document,
                                      write_checkpoint)
from cnnkit.errors import CnnkitError, describe_os_error


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Checkpoint(Callback):
    order = Phase.SAVE  # after History (Phase.RECORD) has recorded the epoch, so the checkpoint's history includes it

    def __init__(self, directory: str | Path, meta: dict[str, Any] | None = None,
                 log: Callable[[str], None] = _to_stderr) -> None:
        self.directory = Path(directory)
        self.meta = meta or {}
        self.log = log

    def on_epoch_end(self, epoch: int, logs: dict[str, Any]) -> None:
        try:
            write_checkpoint(self.directory, capture_training(self.state, self.meta))
        except OSError as error:
            problem = describe_os_error(error)
            if problem is None:
                raise
            discard_unreferenced_tensors(self.directory)
            last = checkpoint_epoch(self.directory)
            kept = f"the checkpoint of epoch {last} is kept" if last is not None else "there is no checkpoint yet"
            self.log(f"checkpoint of epoch {epoch} not written ({problem}); training goes on, {kept}")


def discard_unreferenced_tensors(directory: Path) -> None:
    """Remove a tensor file that a failed write left without its checkpoint.json (it would only take space)."""

    try:
        named = read_checkpoint_document(directory)["tensors"] if (directory / CHECKPOINT_JSON).is_file() else None
    except CnnkitError:
        return
    for path in directory.glob("checkpoint-*.safetensors"):
        if path.name != named:
            path.unlink(missing_ok=True)

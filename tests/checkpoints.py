"""Waiting for a real training process to reach a checkpoint, shared by the resume and distributed tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from cnnkit.engine.callbacks import Callback
from cnnkit.engine.checkpoint import CHECKPOINT_JSON


def wait_for_checkpoint(runs: Path, epoch: int, process: subprocess.Popen, timeout: float = 300) -> Path:
    """The staging directory under `runs` once its checkpoint has reached `epoch` (the process still alive).

    On a timeout the process's whole group is killed (a torchrun launch has workers in sessions of their own,
    which die with it: cnnkit.lifetime) and the test fails.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        for path in runs.glob(f".*.partial-*/{CHECKPOINT_JSON}"):
            try:
                if json.loads(path.read_text())["state"]["epoch"] >= epoch:
                    return path.parent
            except (ValueError, KeyError, OSError):
                pass  # being replaced this instant
        time.sleep(0.05)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (PermissionError, ProcessLookupError):
        process.kill()
    raise AssertionError(f"no checkpoint of epoch {epoch} within {timeout} s")


class StopAfter(Callback):
    """Raise after the checkpoint of epoch `epoch` has been written, as a crash would."""

    order = 99

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt

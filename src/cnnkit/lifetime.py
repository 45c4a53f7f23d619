"""How cnnkit's processes end: children die with their parent, and a failed data-parallel process ends at once.

No worker outlives the command that started it: a decode worker or a torchrun worker blocked on its parent
would otherwise live on, holding memory (and a training process would go on writing), after its parent is
killed with SIGKILL or by the OOM killer, which no handler in the parent can see. Linux delivers a chosen signal
to a process when its parent thread exits (prctl PR_SET_PDEATHSIG); elsewhere this is a no-op. And a failed
data-parallel process holds what must not be freed and ends without Python's teardown (keep_until_exit).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Have the kernel send `sig` to this process when its parent exits; True where that is in place.

    `parent`: the pid that should be the parent. If it is already gone when this runs (the race between
    fork and this call), the signal is sent at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


#: What a failed process must not free before it ends: see keep_until_exit.
_KEPT: list[object] = []


def keep_until_exit(held: object) -> None:
    """Hold `held` (a failure whose traceback reaches a distributed model) until the process ends, and end it
    without tearing down what it holds (end_without_teardown).

    A data-parallel process stopped mid-step has a gradient all-reduce in flight on gloo's worker thread. Freeing
    the model frees its DDP reducer and with it the process group, whose destructor joins that thread while
    holding the GIL, and the thread needs the GIL to drop the finished work's Python state: a deadlock that held
    the process until torchrun's SIGKILL 30 s later, its message lost (2 of 8 two-rank runs stopped by Ctrl-C
    with the cores busy; torch 2.13). Python's own shutdown frees the same objects, so the process ends at once
    instead, as the kernel then closes its sockets and frees its memory.
    """
    _KEPT.append(held)


def end_without_teardown(status: int, interrupted: bool) -> None:
    """End now if keep_until_exit holds anything: by SIGINT when `interrupted` (as Python ends a program stopped by
    Ctrl-C), else with `status`; output is flushed first. Returns when nothing is held."""
    if not _KEPT:
        return
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)

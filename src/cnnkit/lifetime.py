"""Child processes that die with their parent: no worker outlives the command that started it.

A decode worker or a torchrun worker blocked on its parent would otherwise live on, holding memory (and
a training process would go on writing), after its parent is killed with SIGKILL or by the OOM killer,
which no handler in the parent can see. Linux delivers a chosen signal to a process when its parent
thread exits (prctl PR_SET_PDEATHSIG); elsewhere this is a no-op.
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

"""How cnnkit's processes end: children die with their parent, and a command ends without Python's teardown.

No worker outlives the command that started it: a decode worker or a torchrun worker blocked on its parent
would otherwise live on, holding memory (and a training process would go on writing), after its parent is
killed with SIGKILL or by the OOM killer, which no handler in the parent can see. Linux delivers a chosen signal
to a process when its parent thread exits (prctl PR_SET_PDEATHSIG); elsewhere this is a no-op. And every command
ends without Python's teardown once its work is done (end_process), which a failed data-parallel process needs
(keep_until_exit).
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from typing import NoReturn

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
    """Hold `held` (a failure whose traceback reaches a distributed model) until the process ends (end_process).

    A data-parallel process stopped mid-step has a gradient all-reduce in flight on gloo's worker thread. Freeing
    the model frees its DDP reducer and with it the process group, whose destructor joins that thread while
    holding the GIL, and the thread needs the GIL to drop the finished work's Python state: a deadlock that held
    the process until torchrun's SIGKILL 30 s later, its message lost (2 of 8 two-rank runs stopped by Ctrl-C
    with the cores busy; torch 2.13). Python's own teardown frees the same objects; end_process does not.
    """
    _KEPT.append(held)


#: The exit status of a command whose reader closed its output early (`cnnkit predict ... | head`): a shell's 128
#: + SIGPIPE, with nothing said.
BROKEN_PIPE = 141


def end_process(status: int, interrupted: bool) -> NoReturn:
    """End a command whose work is done and said: what CPython's exit does that anyone can see, without freeing
    every module's objects. By SIGINT when `interrupted` (as Python ends a program stopped by Ctrl-C), else with
    `status` (BROKEN_PIPE for a command that succeeded but whose reader left before the last of its output).

    Python's exit waits for non-daemon threads, runs the atexit handlers (logging's flush, multiprocessing's wait
    for worker processes, temporary folders' finalizers) and flushes stdout and stderr, then C's exit flushes the
    C library's buffers; this does those, in that order. What it leaves out is the teardown between them, which
    frees what every module holds: with torch loaded, a quarter of a short command's time (benchmarks/RESULTS.md,
    "Ending a command"). A failed data-parallel process (keep_until_exit) skips the threads and handlers too, as
    any of them may wait on the stuck all-reduce.
    """
    if not _KEPT:
        threading._shutdown()  # CPython's first step at exit, as Py_FinalizeEx calls it
        atexit._run_exitfuncs()  # and its second (neither has a public name; both are long-standing)
    status = _flush_output(status)
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def _flush_output(status: int) -> int:
    """Flush Python's stdout and stderr (None where the process started without them), then every C stream."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except BrokenPipeError:
            if stream is sys.stdout and status == 0:
                status = BROKEN_PIPE
        except (OSError, ValueError):
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # a native library's printf, as C's exit would
    except (OSError, AttributeError):
        pass
    return status

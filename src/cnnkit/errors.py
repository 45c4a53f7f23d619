"""The one exception type for mistakes a user can make (bad file, unknown name, bad flag).

The CLI prints these as a single line without a traceback and exits non-zero; anything else is a bug
and keeps its traceback. An OSError the user can fix (permission, full disk, read-only disk, a file where
a folder should be) is treated the same way: `describe_os_error` turns it into one line naming the path
and the fix.
"""

from __future__ import annotations

import errno

#: The exit status of a command stopped by Ctrl-C or SIGTERM: the shell's for a process ended by SIGINT (128 + 2).
#: `cnnkit` and `python -m cnnkit` turn it into an end by SIGINT itself (cli.console_main).
INTERRUPTED = 130


class CnnkitError(Exception):
    """A user-facing error whose message names the file or value at fault and, where possible, the fix."""


class RunInterrupted(CnnkitError):
    """Training was stopped (Ctrl-C, SIGTERM) after a checkpoint: the message says where and how to resume."""

    exit_code = INTERRUPTED


class TrainingDiverged(CnnkitError):
    """The loss (or a validation figure) became NaN or infinite: the weights are no longer worth saving.

    Raised by the TerminateOnNaN callback before the bad epoch is recorded or checkpointed, so what is
    kept (a checkpoint of the last good epoch) holds only finite results.
    """


class RunNotWritten(CnnkitError):
    """A finished training could not be written where asked (full or read-only disk); the message says
    where the trained run went instead, or that nowhere had room."""


#: What the user can do about an OSError, by errno: the errors a person fixes, not a bug in cnnkit.
OS_ERROR_FIXES: dict[int, str] = {
    errno.EACCES: "permission denied: choose a location you can write to, or change its permissions",
    errno.EPERM: "operation not permitted: choose a location you can write to, or change its permissions",
    errno.EROFS: "the file system is read-only: choose a location on a writable disk",
    errno.ENOSPC: "no space left on the device: free some space or choose a location on another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or choose a location on another disk",
    errno.EFBIG: "file too large for this file system: choose a location on another disk",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "is a folder, not a file: name a file",
    errno.EEXIST: "already exists: choose another name or remove it",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.ENOENT: "no such file or folder: check the path",
}


def os_error_fix(error: BaseException) -> str | None:
    """What the problem is and what to do about it, for an OSError the user can fix; else None."""
    if not isinstance(error, OSError):
        return None
    return OS_ERROR_FIXES.get(error.errno)


def describe_os_error(error: BaseException) -> str | None:
    """'PATH: the fix' for an OSError the user can fix, or None (then it is a bug and keeps its traceback)."""
    fix = os_error_fix(error)
    if fix is None:
        return None
    return fix if error.filename is None else f"{error.filename}: {fix}"

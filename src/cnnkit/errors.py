"""The one exception type for mistakes a user can make (bad file, unknown name, bad flag).

The CLI prints these as a single line without a traceback and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class CnnkitError(Exception):
    """A user-facing error whose message names the file or value at fault and, where possible, the fix."""


class RunInterrupted(CnnkitError):
    """Training was stopped (Ctrl-C, SIGTERM) after a checkpoint: the message says where and how to resume.

    `exit_code` is the shell's for a process ended by Ctrl-C (128 + SIGINT).
    """

    exit_code = 130

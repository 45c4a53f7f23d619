"""Atomic file writes: every file cnnkit writes appears whole or not at all.

A crash, Ctrl-C or full disk during a write must never leave a half-written model, cache or download
where a later run would trust it, so writes go to a temporary file in the same directory (same file
system, so the final rename is atomic) and are renamed into place only once complete.

The writer holds an flock on its temporary file while it writes. A kill -9 leaves the file behind, but
the kernel drops the lock with the process, so the next start can tell debris (`sweep_stale_temp_files`:
no lock held) from a write in progress in another process (locked), and remove only the debris.
A failed write is an OSError naming the final file, whatever the writer raised (safetensors reports a
full disk as its own error type): the CLI prints it as one line with the fix.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

#: The name atomic_path gives its temporary file: ".FINAL.<mkstemp's 8 characters>.tmp".
TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def current_umask() -> int:
    """The process umask (reading it requires setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    For writers that want a file name rather than a file object (savefig, safetensors, downloaders).
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = locked_temp_file(final)
    except OSError as error:
        raise write_error(error, final, None) from None
    try:
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; give the file normal permissions
            os.replace(tmp, final)
        except BaseException as error:
            tmp.unlink(missing_ok=True)
            translated = write_error(error, final, tmp)
            if translated is error:
                raise
            raise translated from error
    finally:
        os.close(fd)  # releases the lock: only after the file is renamed into place or removed


def locked_temp_file(final: Path) -> tuple[int, Path]:
    """A new temporary file beside `final`, flocked: (its open fd, its path).

    A sweeper in another process may take the lock in the instant between creation and locking (it then
    removes the file); then another name is made.
    """
    for _ in range(100):
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        if lock_fd(fd, name):
            return fd, Path(name)
        os.close(fd)
    raise OSError(errno.EAGAIN, "could not lock a temporary file", str(final))


def write_error(error: BaseException, final: Path, tmp: Path | None) -> BaseException:
    """The failure of a write to `final` as an OSError naming `final` where it was an I/O failure.

    An OSError gets `final` as its file name when it has none or names the temporary file; an error of
    another type that reports an OS error the Rust way ("... (os error 28)", safetensors) becomes that
    OSError. Anything else is returned unchanged.
    """
    if isinstance(error, OSError):
        if error.filename is None or (tmp is not None and error.filename == str(tmp)) or (
                tmp is None and TEMP_NAME.fullmatch(Path(str(error.filename)).name)):
            error.filename = str(final)
        return error
    if match := re.search(r"\(os error (\d+)\)", str(error)):
        code = int(match[1])
        return OSError(code, os.strerror(code), str(final))
    return error


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file for writing that replaces `path` when the block exits cleanly."""
    if "w" not in mode:
        raise ValueError(f"atomic_write needs a write mode, got {mode!r}")
    if "b" not in mode:
        open_kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **open_kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Atomically write a whole text file."""
    with atomic_write(path, "w") as handle:
        handle.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Atomically write a whole binary file."""
    with atomic_write(path, "wb") as handle:
        handle.write(data)


@contextlib.contextmanager
def removing_new_dirs_on_failure(folder: str | os.PathLike[str]) -> Iterator[None]:
    """On failure of the block, remove the folders on the way to `folder` that it created, if left empty.

    A failed download or export must not leave behind the empty folders it made for its file.
    """
    created = []
    for path in (Path(folder), *Path(folder).parents):
        if path.exists():
            break
        created.append(path)
    try:
        yield
    except BaseException:
        for path in created:  # deepest first
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


# ---------------------------------------------------------------------------------------------------------
# Locks that die with their process, and the debris of processes that died


def lock_fd(fd: int, path: str | os.PathLike[str]) -> bool:
    """Take an exclusive flock on the open `fd` without waiting; True if taken and `path` still names its file.

    A flock belongs to the open file and the kernel drops it when its process dies, however it dies: a
    lock that can be taken means no live owner. The check that `path` still names the locked file closes
    the race with a process that removed the file between our open and our lock.
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def try_lock(path: str | os.PathLike[str]) -> int | None:
    """An open fd holding the exclusive flock on `path` (a file or a folder), or None when another live
    process holds it or the path is gone. Close the fd to release the lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    if lock_fd(fd, path):
        return fd
    os.close(fd)
    return None


def pread_into(fd: int, out: np.ndarray, offset: int) -> int:
    """Fill the C-contiguous array `out` from the file at `offset`; a read may return less than asked, so loop.

    Returns the bytes read: fewer than `out.nbytes` only where the file ends first (the caller names the file).
    """
    view = memoryview(out).cast("B")
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done


def sweep_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files in `folder` that atomic_path left when its process died; return them.

    Only files named as atomic_path names them and whose lock no live process holds: a write going on
    in another process right now is left alone. A folder that cannot be listed or changed is skipped.
    """
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    removed = []
    for path in entries:
        if not TEMP_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_file():
            continue
        fd = try_lock(path)
        if fd is None:
            continue
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass  # a read-only folder: it stays, and nothing relies on it
        finally:
            os.close(fd)
    return removed

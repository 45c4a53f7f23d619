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
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from cnnkit.errors import CnnkitError

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


def sweep_stale_temp_files(folder: str | os.PathLike[str], final: str | None = None) -> list[Path]:
    """Remove the temporary files in `folder` that atomic_path left when its process died; return them.

    Only files named as atomic_path names them and whose lock no live process holds: a write going on
    in another process right now is left alone. With `final`, only the temporary files of that one file name
    (for folders a user named, where other programs' temp files of the same pattern may live). A folder that
    cannot be listed or changed is skipped.
    """
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    removed = []
    for path in entries:
        if not TEMP_NAME.fullmatch(path.name) or path.is_symlink() or not path.is_file():
            continue
        if final is not None and not (path.name.startswith(f".{final}.") and len(path.name) == len(final) + 14):
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


# ---------------------------------------------------------------------------------------------------------
# The one reader: every file a person or another program could have touched is read through here


#: Caps on what cnnkit reads, by kind of file: far above anything cnnkit writes (a 1,000-epoch run's history.csv
#: is ~150 kB), far below what would hurt (a `/dev/zero` link grew to 3.8 GB in 6 s through a plain read).
MAX_BYTES = {"config": 1 << 20, "json": 16 << 20, "csv": 16 << 20, "header": 64 << 20}
#: Nesting and integer-size limits of parsed JSON/TOML: cnnkit's own files nest 4 deep and hold no integer above
#: 2**63; the parsers themselves recurse (a 3,001-level file raised RecursionError) and Python refuses to convert
#: integers of more than 4,300 digits (ValueError).
MAX_DEPTH = 32
MAX_INTEGER_DIGITS = 40


class UnreadableFile(CnnkitError, ValueError):
    """A file or path that the one reader or writer refuses: its message names it, the problem and the fix."""


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_capped(path: str | os.PathLike[str], max_bytes: int, *, follow_links: bool = True) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them.

    Opened non-blocking (a FIFO opens at once instead of waiting for a writer) and checked with fstat before a
    byte is read, so a FIFO, a device or a folder is refused rather than read forever; the read itself is capped
    too, for files that grow while read. `follow_links=False` refuses a link (ELOOP) for a file that must be the
    folder's own. Raises FileNotFoundError (the caller knows what a missing file means), OSError the user can fix,
    or UnreadableFile.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_links else os.O_NOFOLLOW))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnreadableFile(f"{path}: {_file_kind(info.st_mode)}, not a regular file: name a regular file")
        if info.st_size > max_bytes:
            raise UnreadableFile(f"{path}: {info.st_size:,} bytes, more than the {max_bytes:,} such a file may have")
        os.set_blocking(fd, True)
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise UnreadableFile(f"{path}: more than the {max_bytes:,} bytes such a file may have")
        return b"".join(chunks)
    finally:
        os.close(fd)


def require_regular_file(path: str | os.PathLike[str]) -> None:
    """Refuse, before a library opens it, a path that is not a regular file: safetensors and onnxruntime open
    their files themselves, and a FIFO there would block them forever. FileNotFoundError when it is missing."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise UnreadableFile(f"{path}: {_file_kind(mode)}, not a regular file: name a regular file")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks: how runs record where their weights came from."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: str | os.PathLike[str]) -> dict:
    """A safetensors file's tensors (never pickle: reading weights runs no code). The one reader of weights: runs,
    checkpoints, `--init`, `--weights` and pretrained backbones all read through here (safetensors imported
    only when called, so `cnnkit --help` stays free of torch)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        require_regular_file(path)
        return load_file(str(path))
    except FileNotFoundError:
        raise CnnkitError(f"{path}: file not found") from None
    except UnreadableFile:
        raise
    except (SafetensorError, OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CnnkitError(f"{path}: cannot load weights ({first})") from None


def read_text_capped(path: str | os.PathLike[str], max_bytes: int) -> str:
    """The text of `path` as strict UTF-8 (see read_capped); a byte that is not UTF-8 is named by its offset."""
    data = read_capped(path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise UnreadableFile(f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8") from None


def _checked_integer(text: str) -> int:
    digits = len(text.lstrip("+-"))
    if digits > MAX_INTEGER_DIGITS:
        raise ValueError(f"an integer of {digits} digits (at most {MAX_INTEGER_DIGITS})")
    return int(text)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object as a dict, refusing a key it gives twice."""
    table: dict[str, object] = {}
    for key, value in pairs:
        if key in table:
            raise ValueError(f"the key {json.dumps(key)[:80]} is given twice in one object")
        table[key] = value
    return table


def check_depth(value: object, where: str, limit: int = MAX_DEPTH) -> None:
    """Refuse a parsed document nested deeper than `limit` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                raise UnreadableFile(f"{where}: nested more than {limit} levels deep")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)


def parse_json(text: str, where: str) -> object:
    """JSON text as Python values, within MAX_DEPTH and MAX_INTEGER_DIGITS and each key once in an object (as TOML
    requires; JSON's last-one-wins would hide an edit); UnreadableFile naming `where` else."""
    try:
        value = json.loads(text, parse_int=_checked_integer, object_pairs_hook=_unique_keys)
    except (json.JSONDecodeError, ValueError, RecursionError) as error:
        raise UnreadableFile(f"{where}: not valid JSON ({_parse_problem(error)})") from None
    check_depth(value, where)
    return value


def parse_toml(text: str, where: str) -> object:
    """TOML text as Python values, within the same limits as parse_json."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        value = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError, RecursionError) as error:
        raise UnreadableFile(f"{where}: not valid TOML ({_parse_problem(error)})") from None
    check_depth(value, where)
    _check_integers(value, where)
    return value


def _check_integers(value: object, where: str) -> None:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not isinstance(item, bool) and item.bit_length() > 3.33 * MAX_INTEGER_DIGITS:
            raise UnreadableFile(f"{where}: an integer of more than {MAX_INTEGER_DIGITS} digits")


def _parse_problem(error: BaseException) -> str:
    """A parser's message on one line; the parsers recurse per level, so too deep a document is a RecursionError."""
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return " ".join(str(error).split())


def read_json(path: str | os.PathLike[str], max_bytes: int = MAX_BYTES["json"]) -> object:
    """A JSON file through the one reader: regular, capped, strict UTF-8, bounded nesting and integers."""
    return parse_json(read_text_capped(path, max_bytes), str(path))


def read_toml(path: str | os.PathLike[str], max_bytes: int = MAX_BYTES["config"]) -> object:
    """A TOML file through the one reader."""
    return parse_toml(read_text_capped(path, max_bytes), str(path))


# ---------------------------------------------------------------------------------------------------------
# The one writer's checks: every file cnnkit writes at a path a user names goes through `output_path`

#: A folder holding any of these is a run directory (or its staging folder).
RUN_MARKERS = ("model.json", "metrics.json", "checkpoint.json")
#: The files a run directory's training and commands write: a command writing at a path a user named replaces
#: none of these but its own artifact (other files there, a predictions.csv written earlier, are the user's).
RUN_FILES = re.compile(r"(model|metrics|config|checkpoint)\.json|model\.safetensors|checkpoint-\d+\.safetensors|"
                       r"(history|steps)\.csv|report\.html|model_source\.py|model\.onnx|model\.torchscript\.pt|"
                       r"(history|confusion_matrix|per_class|errors)\.png")


def expand_user_path(text: str | os.PathLike[str], option: str) -> Path:
    """A path as the user typed it, `~` and `~user` expanded the same way for every option; a NUL byte or an
    unknown user is a one-line error naming `option` (the OS would raise ValueError or make a folder named `~`)."""
    raw = os.fspath(text)
    if "\0" in raw:
        raise UnreadableFile(f"{option} {raw!r}: a path cannot hold a NUL character")
    expanded = os.path.expanduser(raw)
    if expanded.startswith("~"):
        user = expanded[1:].split("/", 1)[0]
        raise UnreadableFile(f"{option} {raw}: there is no user named {user!r} to expand ~{user}; "
                             "give the folder's full path")
    return Path(expanded)


def run_name_problem(name: str) -> str | None:
    """What is wrong with `name` as a run directory's name, else None: the one rule `--name` and every writer of a
    run follow (the hidden staging directory `.NAME.partial-*` adds ~20 bytes; names stop at 255)."""
    if name in ("", ".", "..") or name.startswith(".") or "/" in name or "\0" in name:
        return f"{name!r} is not a valid run directory name (no '/', not starting with '.')"
    if len(name.encode("utf-8", "surrogateescape")) > 200:
        return f"is {len(name.encode('utf-8', 'surrogateescape'))} bytes long; use at most 200"
    return None


def is_run_directory(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in RUN_MARKERS)


def output_folder(folder: str | os.PathLike[str], option: str) -> Path:
    """A folder a command writes files into (--show-input, --explain, audit --out), checked before any work is
    done: a folder or a new one, not a link and not a run directory (whose files no other command touches).
    A killed earlier writer's half-written file in it is swept."""
    path = expand_user_path(folder, option)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UnreadableFile(f"{option} {path}: is not a folder; name a new or existing folder")
    if is_run_directory(path):
        raise UnreadableFile(f"{option} {path}: is a run directory, whose files this command must not touch; "
                             "name another folder")
    sweep_stale_temp_files(path)
    return path


def output_path(path: str | os.PathLike[str], option: str, *, own: Path | None = None, sweep: bool = True) -> Path:
    """The file a command may write at `path` (a user's `--out`, `--csv`, ...), checked before any work is done.

    Refuses to replace anything that is not a regular file (a link, a device, a FIFO, a folder: writing would
    replace what the path is, not write into it) and any of a run directory's own files (RUN_FILES) unless it is
    `own` (the command's own artifact, such as RUN/model.onnx for `export`): no command writes over a run's
    weights. The temporary files a killed writer of this same file left beside it are swept here (with
    `sweep`), so every command that writes cleans up after a killed predecessor.
    """
    target = expand_user_path(path, option)
    try:
        info = os.lstat(target)
    except OSError:  # not there, or its folder cannot be reached: the write itself will say why it fails
        info = None
    if info is not None and not stat.S_ISREG(info.st_mode):
        kind = "a link" if stat.S_ISLNK(info.st_mode) else _file_kind(info.st_mode)
        raise UnreadableFile(f"{option} {target}: is {kind.removeprefix('not ')}; cnnkit replaces only regular "
                             "files: name a new file")
    folder = target.parent
    if (info is not None and RUN_FILES.fullmatch(target.name) and is_run_directory(folder)
            and (own is None or target.resolve() != own.resolve())):
        raise UnreadableFile(f"{option} {target}: is a file of the run in {folder}, which this command must not "
                             "replace; choose another path")
    if sweep:
        sweep_stale_temp_files(folder, target.name)
    return target

"""Find the data directory and fetch missing dataset files into it, verified and atomically.

A file that is already in place is trusted without any network access or re-hashing (the readers check
its structure anyway), so a run with the data present works offline and starts instantly. A missing
file is downloaded into a temporary file beside its final name, checked against the registry, and only
then renamed into place: an interrupted or wrong download never leaves a file a later run would trust.
Every transfer is capped near the registry's size of the file (`size_cap`), so an endless or wrong
response stops with a clear error instead of filling the disk.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import zlib
from pathlib import Path

import platformdirs

from cnnkit.data.registry import DatasetSpec, FileSpec
from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_path, expand_user_path, removing_new_dirs_on_failure

__all__ = ["data_root", "dataset_dir", "dataset_present", "fetch_dataset", "how_to_provide", "missing_files",
           "size_cap", "split_roles", "verify_file"]

DATA_ENV = "CNNKIT_DATA"
MIRROR_ENV = "CNNKIT_MIRROR"
TIMEOUT_S = 30  # per connect / per read, so a dead mirror fails fast instead of hanging a run
_CHUNK = 1 << 20


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where datasets and caches live: `data_dir`, else $CNNKIT_DATA, else the user cache (~/.cache/cnnkit)."""
    if data_dir is not None and str(data_dir) != "":
        return expand_user_path(data_dir, "--data-dir")
    from_env = os.environ.get(DATA_ENV, "").strip()
    if from_env:
        return expand_user_path(from_env, f"${DATA_ENV}")
    return Path(platformdirs.user_cache_dir("cnnkit"))


def dataset_dir(spec: DatasetSpec, root: str | os.PathLike[str]) -> Path:
    """The folder holding one dataset's files: `root/<name>/`, the same layout a mirror serves."""
    return Path(root) / spec.name


def split_roles(spec: DatasetSpec, splits: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The file roles that hold `splits` ("train", "test"): e.g. test_images + test_labels for an IDX
    dataset, the one archive for CIFAR. None means every file of the dataset."""
    if splits is None:
        return tuple(spec.files)
    roles: list[str] = []
    for role in spec.files:
        if role.split("_", 1)[0] in splits or "_" not in role:  # "archive" holds every split
            roles.append(role)
    return tuple(roles)


def _files(spec: DatasetSpec, roles: tuple[str, ...] | None) -> list[FileSpec]:
    if roles is None:
        return list(spec.files.values())
    unknown = [role for role in roles if role not in spec.files]
    if unknown:
        raise ValueError(f"dataset {spec.name} has no file role(s) {', '.join(unknown)}; "
                         f"it has {', '.join(spec.files)}")
    return [spec.files[role] for role in roles]


def missing_files(
    spec: DatasetSpec, root: str | os.PathLike[str], roles: tuple[str, ...] | None = None
) -> list[Path]:
    """The paths under `root/<name>/` of the files (of `roles`, default all) that are not there yet."""
    folder = dataset_dir(spec, root)
    return [folder / file.filename for file in _files(spec, roles) if not (folder / file.filename).is_file()]


def dataset_present(
    spec: DatasetSpec, root: str | os.PathLike[str], roles: tuple[str, ...] | None = None
) -> bool:
    """True when every file of `spec` (or of `roles`) exists under `root/<name>/` (existence only; no hashing)."""
    return not missing_files(spec, root, roles)


def fetch_dataset(
    spec: DatasetSpec,
    root: str | os.PathLike[str],
    *,
    mirror: str | None = None,
    progress: bool = True,
    roles: tuple[str, ...] | None = None,
) -> Path:
    """Make sure the files of `spec` (only those of `roles` when given) are in `root/<name>/`, downloading
    only the missing ones; return that folder.

    `mirror` (or $CNNKIT_MIRROR) is a base URL serving `{mirror}/{name}/{filename}`, or a local folder with
    that layout; without one the registry's canonical URLs are tried in order. On failure the error names
    the cause, every file still missing and the ways to provide them, and every folder this call created
    (the dataset folder, the data root, their parents) is removed again when empty.
    """
    folder = dataset_dir(spec, root)
    missing = [file for file in _files(spec, roles) if not (folder / file.filename).is_file()]
    if not missing:
        return folder
    if Path(root).name == spec.name and all((Path(root) / file.filename).is_file() for file in missing):
        raise CnnkitError(f"{root} is the {spec.name} folder itself; --data-dir names the folder that holds "
                          f"{spec.name}/: --data-dir {Path(root).parent}")  # before any download into it
    mirror = check_mirror(mirror or os.environ.get(MIRROR_ENV, "").strip() or None)
    try:
        with removing_new_dirs_on_failure(folder):
            for file in missing:
                _fetch_file(file, folder / file.filename, _sources(spec, file, mirror), progress=progress)
    except CnnkitError as error:
        still = [folder / file.filename for file in missing if not (folder / file.filename).is_file()]
        raise CnnkitError(f"{error}; {how_to_provide(spec, still)}") from None
    return folder


def check_mirror(mirror: str | None) -> str | None:
    """A mirror is an http(s) URL, a file:// URL or a local folder; another scheme (ftp://, s3://) would be
    taken for a folder named so and fail as a missing file."""
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", mirror or "")
    if scheme and scheme[1].lower() not in ("http", "https", "file"):
        raise CnnkitError(f"mirror {mirror}: {scheme[1]}:// is not supported; give an http://, https:// or file:// "
                          f"URL or a local folder (--mirror or {MIRROR_ENV})")
    return mirror


def how_to_provide(spec: DatasetSpec, paths: list[Path]) -> str:
    """One line naming the missing files and the three ways to provide them."""
    names = " and ".join(str(path) for path in paths) if len(paths) <= 2 else ", ".join(map(str, paths))
    root = paths[0].parent.parent if paths else None
    if root is not None and root.name == spec.name:  # --data-dir named the dataset's own folder, not its parent
        return (f"missing {names}: --data-dir names the folder that holds {spec.name}/, not {spec.name}/ itself; "
                f"try --data-dir {root.parent}")
    return (
        f"missing {names}; provide {'it' if len(paths) == 1 else 'them'} with --data-dir DIR or {DATA_ENV}=DIR "
        f"(a folder holding {spec.name}/ with {'this file' if len(paths) == 1 else 'these files'}), or "
        f"{MIRROR_ENV}=URL (a mirror or local folder serving URL/{spec.name}/FILE)"
    )


def verify_file(path: str | os.PathLike[str], file: FileSpec) -> str | None:
    """Return None when `path` is the file `file` describes, else a one-line description of the mismatch.

    Accepts the canonical md5 or, for gzip files, the sha256 of the decompressed content: a mirror that
    re-compressed the file (different gzip header, same data) is still serving the right data.
    """
    if file.md5 is None and file.content_sha256 is None:
        return None
    got_md5 = _digest(path, hashlib.md5(usedforsecurity=False))
    if got_md5 == file.md5:
        return None
    if file.content_sha256 is None:
        return f"expected md5 {file.md5}, got {got_md5}"
    got_sha = _content_sha256(path)
    if got_sha == file.content_sha256:
        return None
    expected = f"content sha256 {file.content_sha256}"
    if file.md5:
        expected = f"md5 {file.md5} or {expected}"
    return f"expected {expected}, got md5 {got_md5}, content sha256 {got_sha or '(not valid gzip)'}"


# ---------------------------------------------------------------------------------------------------------
# Where to get a file from


def _sources(spec: DatasetSpec, file: FileSpec, mirror: str | None) -> list[str]:
    """The URLs (or local paths) to try for `file`, in order: the mirror alone if set, else the canonical list."""
    if mirror:
        return [f"{mirror.rstrip('/')}/{spec.name}/{file.filename}"]
    return list(file.urls)


def _is_remote(source: str) -> bool:
    """True for http(s) URLs; anything else (a path or file:// URL) is copied from the local disk."""
    return source.startswith(("http://", "https://"))


def _local_path(source: str) -> Path:
    """Turn a file:// URL or plain path into a Path."""
    return Path(source.removeprefix("file://")).expanduser()


# ---------------------------------------------------------------------------------------------------------
# Transfer + verification


#: A download may exceed the canonical file's size by this factor plus SIZE_SLACK bytes before it is cut off:
#: a mirror that re-compressed the file still fits (gzip -1 of MNIST's train images measured 1.11x the
#: canonical -9 file, of Fashion-MNIST's 1.03x), an endless or wrong response does not fill the disk.
SIZE_MARGIN = 1.5
SIZE_SLACK = 1 << 20
#: The cap of a file whose size the registry does not record (none of the built-in ones).
UNKNOWN_SIZE_CAP = 1 << 30


def size_cap(file: FileSpec) -> int:
    """The most bytes a download of `file` may bring: its canonical size with margin, else 1 GiB."""
    if file.size is None:
        return UNKNOWN_SIZE_CAP
    return int(file.size * SIZE_MARGIN) + SIZE_SLACK


def _fetch_file(file: FileSpec, target: Path, sources: list[str], *, progress: bool) -> None:
    """Try each source in turn; the first verified copy is renamed onto `target`. Raise the last failure.

    A failed or refused transfer leaves no file behind: it is written to a temporary file beside `target`
    that only a verified copy replaces `target` with.
    """
    last_error: CnnkitError | None = None
    for source in sources:
        try:
            with atomic_path(target) as tmp:
                _transfer(source, tmp, file, progress=progress)
                problem = verify_file(tmp, file)
                if problem is not None:
                    raise CnnkitError(f"checksum mismatch for {source}: {problem}")
            return
        except CnnkitError as error:
            last_error = error
    assert last_error is not None
    if len(sources) > 1:
        raise CnnkitError(f"{last_error} (tried {len(sources)} sources for {file.filename})")
    raise last_error


def _transfer(source: str, destination: Path, file: FileSpec, *, progress: bool) -> None:
    """Copy `source` to `destination`, over HTTP or from the local disk, at most size_cap(file) bytes.

    Raises CnnkitError for a failure of the source (unreachable, HTTP error, cut, too large); an error
    writing `destination` (a full disk) stays an OSError naming the file, so it is not blamed on the network.
    """
    cap = size_cap(file)
    if not _is_remote(source):
        _copy_local(_local_path(source), destination, file, cap)
        return
    import requests  # imported here: offline runs with the data present never need it

    try:
        # Ask for the bytes as stored: a server that gzip-encodes a .gz again would otherwise be decoded by
        # requests and the checksum would fail for the wrong reason.
        with requests.get(source, stream=True, timeout=TIMEOUT_S, headers={"Accept-Encoding": "identity"}) as response:
            response.raise_for_status()
            declared = _declared_length(response)
            if declared is not None and declared > cap:
                raise CnnkitError(f"download of {source} refused: the server announces {_size(declared)}, but "
                                  f"{file.filename} is {_expected(file)} (at most {_size(cap)} accepted)")
            with _progress(file.filename, declared, progress) as advance:
                _write_capped(response.iter_content(_CHUNK), destination, source, file, cap, advance)
    except requests.RequestException as error:
        raise CnnkitError(f"download of {source} failed: {_describe(error)}") from None


def _copy_local(path: Path, destination: Path, file: FileSpec, cap: int) -> None:
    """Copy a local mirror's file (capped too: it may be a link to a device that never ends)."""

    def chunks():
        try:
            with open(path, "rb") as handle:
                while chunk := handle.read(_CHUNK):
                    yield chunk
        except OSError as error:
            raise CnnkitError(f"copy of {path} failed: {error.strerror or error}") from None

    _write_capped(chunks(), destination, str(path), file, cap, lambda amount: None)


def _write_capped(chunks, destination: Path, source: str, file: FileSpec, cap: int, advance) -> None:
    """Write `chunks` to `destination`, stopping with a CnnkitError before the file would pass `cap` bytes."""
    written = 0
    with open(destination, "wb") as out:
        for chunk in chunks:
            if written + len(chunk) > cap:
                raise CnnkitError(f"download of {source} stopped at {_size(cap)}: {file.filename} is "
                                  f"{_expected(file)}, and the source kept sending (an endless or wrong "
                                  f"response); nothing was kept")
            out.write(chunk)
            written += len(chunk)
            advance(len(chunk))


def _declared_length(response) -> int | None:
    """The response's Content-Length as a number, or None when absent or not a number."""
    try:
        return int(response.headers.get("content-length", ""))
    except ValueError:
        return None


@contextlib.contextmanager
def _progress(label: str, total: int | None, enabled: bool):
    """A byte progress bar (drawn only once the server has answered), yielding its advance function.

    A finished bar stays on the screen as a record of the download; a failed one is removed, so the
    error stays the one line about it.
    """
    if not enabled:
        yield lambda amount: None
        return
    from cnnkit.progress import make_progress  # rich only when a bar is drawn: a cached dataset draws none

    bar = make_progress("bytes", transient=False)
    task = bar.add_task(label, total=total or None)
    bar.start()
    try:
        yield lambda amount: bar.advance(task, amount)
    except BaseException:
        bar.update(task, visible=False)
        raise
    finally:
        bar.stop()


def _size(count: int) -> str:
    """A byte count as a person reads it: 4,542 bytes, 9.9 MB, 1000.0 GB."""
    if count < 100_000:
        return f"{count:,} bytes"
    return f"{count / 1e6:.1f} MB" if count < 1e9 else f"{count / 1e9:.1f} GB"


def _expected(file: FileSpec) -> str:
    if file.size is None:
        return "of unknown size"
    return _size(file.size) if file.size < 100_000 else f"{_size(file.size)} ({file.size:,} bytes)"


def _describe(error: BaseException) -> str:
    """The cause of a failed transfer in a few words; requests nests three layers of wrapper messages."""
    response = getattr(error, "response", None)
    if response is not None and response.status_code >= 400:
        return f"HTTP {response.status_code} {response.reason}"
    text = " ".join(str(error).split()) or type(error).__name__
    if match := re.search(r"IncompleteRead\((\d+) bytes read, (\d+) more expected\)", text):
        return f"connection closed mid-file after {match[1]} bytes, {match[2]} more expected"
    if "timed out" in text.lower():
        return f"no data from the server for {TIMEOUT_S} s (timed out)"
    if match := re.search(r"\[Errno -?\d+\] [^\"')]+", text):
        return f"could not connect: {match[0].strip()}"
    return text if len(text) <= 300 else text[:297] + "..."


def _digest(path: str | os.PathLike[str], hasher) -> str:
    """Hash a file in chunks so a 170 MB archive never sits in memory twice."""
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()


def _content_sha256(path: str | os.PathLike[str]) -> str | None:
    """sha256 of the gunzipped content, or None when the file is not valid gzip."""
    hasher = hashlib.sha256()
    try:
        with gzip.open(path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                hasher.update(chunk)
    except (OSError, EOFError, zlib.error):
        return None
    return hasher.hexdigest()

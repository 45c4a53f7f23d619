"""The run directory: everything one training produced, saved so it loads with no other input.

Layout of RUNS_DIR/NAME/: config.json, history.csv, steps.csv, metrics.json, model.safetensors, model.json,
history.png, confusion_matrix.png, per_class.png, errors.png, report.html. A run is assembled in a hidden staging
directory and renamed into place only when complete, so an interrupted training leaves no half-written run.
A named run claims its name when it starts (`.NAME.lock`, flocked), so a second training with the same
--name fails at once instead of after its training. Staging directories and claims are flocked by their
process; the next start removes those whose process is gone (`sweep_runs_dir`), except a staging
directory holding a checkpoint: that is resumable work, kept and listed by `cnnkit runs`.
Weights are safetensors and metadata JSON: loading a run never executes code from its files, except a
user's own model file (`--model FILE.py:FUNCTION`, copied to model_source.py), and that only on request
(`trust_code`) and only when its SHA-256 is the recorded one.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError, RunInterrupted, RunNotWritten, describe_os_error, os_error_fix
from cnnkit import fileio
from cnnkit.fileio import (UnreadableFile, atomic_path, current_umask, lock_fd, read_weights,  # noqa: F401 (re-exported)
                           sweep_stale_temp_files, try_lock, write_text)
from cnnkit.records import Metrics, read_metrics

from cnnkit.model_meta import (MODEL_FORMAT, MODEL_FORMAT_VERSION, check_recorded, check_standardisation,
                               read_weights_header, skeleton_state, weights_record)
from cnnkit.model_meta import ModelMeta, read_model_meta, resolve_run_dir  # noqa: F401 (re-exported)
from cnnkit.config import RunConfig, TrainConfig, eval_batch_for
from cnnkit.config import read_run_config as read_config_record
from cnnkit.data.registry import mirror_ok
DEFAULT_RUN_NAME = "train"


def next_run_name(runs_dir: Path, base: str = DEFAULT_RUN_NAME) -> str:
    """train, train2, train3, ...: the first name not taken in `runs_dir`."""
    taken = {p.name for p in runs_dir.iterdir()} if runs_dir.is_dir() else set()
    if base not in taken:
        return base
    numbers = [int(m.group(1)) for name in taken if (m := re.fullmatch(re.escape(base) + r"(\d+)", name))]
    return f"{base}{max([1, *numbers]) + 1}"


def check_name_syntax(name: str) -> None:
    if problem := fileio.run_name_problem(name):
        raise CnnkitError(f"--name {problem}" if problem.startswith("'") else f"--name {name!r} {problem}")


@contextlib.contextmanager
def staged_run(runs_dir: str | Path, name: str | None, *,
               staging: Path | None = None) -> Iterator[tuple[Path, list[Path]]]:
    """Yield (staging_dir, [final_dir]); the staging dir becomes the final run dir on success.

    The final name is picked at commit time when `name` is None, so two trainings started together
    never write into the same directory; a given `name` is claimed first, so a second training with it
    is refused before it trains. `staging` continues an unfinished run's directory (a resume).
    The directory is locked while in use, so a second process cannot resume it at the same time.
    If the block fails after a checkpoint was written, the directory is kept and the error says how to
    resume it; without a checkpoint there is nothing worth keeping and it is removed.
    """
    from cnnkit.engine.checkpoint import has_checkpoint, remove_checkpoint

    runs_dir = prepare_runs_dir(fileio.expand_user_path(runs_dir, "--runs-dir")) if staging is None else staging.parent
    final: list[Path] = []
    with claimed_name(runs_dir, name):
        if name is not None and (runs_dir / name).exists():
            fix = ("a resumed run keeps its name: move that directory away, then resume" if staging is not None
                   else "choose another --name")
            raise CnnkitError(f"run directory {runs_dir / name} already exists; {fix}")
        with (locked_dir(staging) if staging is not None else new_staging_dir(runs_dir, name)) as staging:
            try:
                yield staging, final
            except BaseException as error:
                if has_checkpoint(staging):
                    raise_resumable(error, staging)
                shutil.rmtree(staging, ignore_errors=True)
                raise
            final.append(commit_or_keep(staging, runs_dir, name))
    remove_checkpoint(final[0])


def commit_or_keep(staging: Path, runs_dir: Path, name: str | None) -> Path:
    """Rename the finished staging directory into place; if the disk refuses even that (a full file system
    has no room for the new directory entry), keep it, finished, and say how to move it by hand."""

    try:
        return _commit(staging, runs_dir, name)
    except (OSError, CnnkitError) as error:  # a full disk, or the name taken by hand meanwhile
        problem = describe_os_error(error) if isinstance(error, OSError) else str(error)
        if problem is None:
            raise
        raise RunNotWritten(f"the finished run is complete in {staging} but could not be renamed into place "
                            f"({problem}); rename it yourself: mv {staging} {runs_dir}/NEW_NAME") from None


def prepare_runs_dir(runs_dir: Path) -> Path:
    """`runs_dir`, created if missing; a CnnkitError naming --runs-dir and the fix if it cannot hold runs."""
    if runs_dir.exists() and not runs_dir.is_dir():
        raise CnnkitError(f"--runs-dir {runs_dir} is a file, not a folder: choose another --runs-dir")
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise runs_dir_error(runs_dir, error) from None
    return runs_dir


def runs_dir_error(runs_dir: Path, error: OSError) -> BaseException:
    """An OSError met while starting a run in `runs_dir` as the user's error (one line), else unchanged."""
    fix = os_error_fix(error)
    if fix is None:
        return error
    return CnnkitError(f"--runs-dir {runs_dir}: cannot write a run there: {fix}")


@contextlib.contextmanager
def new_staging_dir(runs_dir: Path, name: str | None) -> Iterator[Path]:
    """A new hidden `.NAME.partial-*` directory in `runs_dir`, flocked by this process while the block runs.

    A sweep in another process may lock and remove it in the instant before this process locks it; then
    another is made.
    """
    for _ in range(100):
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{name or DEFAULT_RUN_NAME}.partial-", dir=runs_dir))
        except OSError as error:
            raise runs_dir_error(runs_dir, error) from None
        fd = try_lock(staging)
        if fd is not None:
            break
    else:
        raise CnnkitError(f"--runs-dir {runs_dir}: could not lock a new run directory there")
    try:
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700
        yield staging
    finally:
        os.close(fd)


@contextlib.contextmanager
def claimed_name(runs_dir: Path, name: str | None) -> Iterator[None]:
    """Hold `runs_dir/.NAME.lock` (flocked) while the block runs: the name is this training's until it ends.

    A second training with the same name fails here, before it loads data or trains. The lock dies with
    its process, so a claim left by a kill -9 is taken over (and swept); the file goes when the block ends.
    """
    if name is None:
        yield
        return
    check_name_syntax(name)
    path = runs_dir / f".{name}{CLAIM_SUFFIX}"
    fd = claim(path, name)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: a waiter then finds its file gone and makes a new one
        os.close(fd)


CLAIM_SUFFIX = ".lock"


def claim(path: Path, name: str) -> int:
    """An fd holding the flock on the claim file `path`, with this process's id in it; a clear error if a
    live training holds it."""
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~current_umask())
        except OSError as error:
            raise runs_dir_error(path.parent, error) from None
        if lock_fd(fd, path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
        if path.exists():  # locked by a live process (a file that vanished meanwhile: try again)
            owner = _claim_owner(path)
            raise CnnkitError(f"run name {name!r} is taken: another cnnkit training{owner} is running with --name "
                              f"{name} in {path.parent}; choose another --name, or wait for it to finish")
    raise CnnkitError(f"{path}: could not claim the run name {name!r}")


def _claim_owner(path: Path) -> str:
    """' (pid N)' as the claim file records it, or '' if it cannot be read yet."""
    try:
        pid = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""


@contextlib.contextmanager
def locked_dir(directory: Path) -> Iterator[Path]:
    """Hold an exclusive flock on `directory` (not a file in it: nothing to clean up) while the block runs.

    The kernel drops the lock when the process dies, however it dies, so a held lock means a live owner.
    """
    fd = try_lock(directory)
    if fd is None:
        if not directory.is_dir():
            raise CnnkitError(f"{directory}: no such run directory (it was removed)")
        raise CnnkitError(f"{directory} is in use by another cnnkit process (it is still training)")
    try:
        yield directory
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------
# The debris of processes that died: removed at the next start


@dataclass
class Sweep:
    """What a sweep of a runs folder found: debris removed, resumable unfinished runs kept."""

    removed: list[Path]
    kept: list[Path]

    def message(self) -> str | None:
        """One line for the user when something was removed, else None."""
        if not self.removed:
            return None
        shown = ", ".join(str(path) for path in self.removed[:3])
        more = f" and {len(self.removed) - 3} more" if len(self.removed) > 3 else ""
        line = (f"removed {len(self.removed)} leftover{'s' if len(self.removed) > 1 else ''} of interrupted "
                f"cnnkit processes: {shown}{more}")
        if self.kept:
            line += (f"; kept {len(self.kept)} unfinished run{'s' if len(self.kept) > 1 else ''} with a checkpoint "
                     f"(`cnnkit runs {self.kept[0].parent}` lists how to resume)")
        return line


def sweep_runs_dir(runs_dir: str | Path) -> Sweep:
    """Remove what dead processes left in `runs_dir`: staging directories without a checkpoint, name
    claims, half-written temporary files (also inside the kept staging directories).

    Only entries whose flock no live process holds: another training's work in progress is never touched.
    A staging directory with a checkpoint is kept: `cnnkit train --resume` continues it.
    """
    from cnnkit.engine.checkpoint import has_checkpoint

    runs_dir = Path(runs_dir)
    removed: list[Path] = [*sweep_stale_temp_files(runs_dir)]
    kept: list[Path] = []
    try:
        entries = sorted(runs_dir.iterdir())
    except OSError:
        return Sweep(removed, kept)
    for path in entries:
        staging = path.name.startswith(".") and ".partial-" in path.name and _is_dir(path) and not path.is_symlink()
        claim_file = path.name.startswith(".") and path.name.endswith(CLAIM_SUFFIX) and path.is_file()
        if not (staging or claim_file):
            continue
        fd = try_lock(path)
        if fd is None:  # a live process's, or gone already
            continue
        try:
            if staging and (has_checkpoint(path) or (path / "metrics.json").is_file()):  # resumable, or finished
                kept.append(path)
                removed += sweep_stale_temp_files(path)
            elif _remove(path):
                removed.append(path)
        finally:
            os.close(fd)
    return Sweep(removed, kept)


def _remove(path: Path) -> bool:
    """Remove a file or a directory tree; False if it could not be (a read-only folder)."""
    try:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------
# Room for a run


def check_free_space(directory: Path, need: int, detail: str, without_checkpoints: int | None = None) -> None:
    """Refuse to start a training whose files will not fit in `directory`'s file system.

    `need` is the estimate in bytes, `detail` what it is made of; `without_checkpoints` the estimate with
    --no-checkpoint, offered as a way out when it would fit.
    """
    try:
        stats = os.statvfs(directory)
    except OSError:
        return  # a file system that cannot say: the writes will tell
    free = stats.f_bavail * stats.f_frsize
    if free >= need:
        return
    way_out = ""
    if without_checkpoints is not None and without_checkpoints <= free:
        way_out = f", or train with --no-checkpoint (needs about {format_size(without_checkpoints)})"
    raise CnnkitError(f"--runs-dir {directory.parent}: {format_size(free)} free, but this run needs about "
                      f"{format_size(need)} ({detail}); free some space or choose another --runs-dir{way_out}")


def format_size(size: float) -> str:
    """1.3 MB, 420 kB, 12 B: a size as a person reads it (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit in ("B", "kB") else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"


def resume_hint(staging: Path) -> str:
    from cnnkit.engine.checkpoint import checkpoint_epoch  # torch: runs stays importable without it (cnnkit --help)

    return (f"the checkpoint of epoch {checkpoint_epoch(staging)} is kept in {staging}; "
            f"continue with: cnnkit train --resume {staging}")


def raise_resumable(error: BaseException, staging: Path) -> None:
    """Re-raise a failure of a run that has a checkpoint, saying where it is and how to resume it."""

    if isinstance(error, KeyboardInterrupt):
        raise RunInterrupted(f"training interrupted; {resume_hint(staging)}") from None
    if isinstance(error, CnnkitError):
        raise type(error)(f"{error}; {resume_hint(staging)}") from error
    if problem := describe_os_error(error):  # a full or read-only disk: one line, with the way back
        raise CnnkitError(f"{problem}; {resume_hint(staging)}") from error
    if hasattr(error, "add_note"):  # a bug: keep its traceback, with the way back to the work
        error.add_note(resume_hint(staging))
    raise error


def _commit(staging: Path, runs_dir: Path, name: str | None) -> Path:
    for _ in range(100):
        target = runs_dir / (name or next_run_name(runs_dir))
        try:
            os.mkdir(target)  # claim the name atomically, then replace the empty dir
            os.replace(staging, target)
            return target
        except FileExistsError:
            if name is not None:
                raise CnnkitError(f"run directory {target} already exists; choose another --name") from None
    raise CnnkitError(f"could not find a free run name in {runs_dir}")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    """A run's JSON file through the one reader (fileio): regular, size-capped, UTF-8, bounded nesting."""
    try:
        return fileio.read_json(path)
    except FileNotFoundError:
        raise CnnkitError(f"{path}: file not found") from None
    except UnreadableFile as error:
        raise CnnkitError(str(error)) from None


def save_model(run_dir: Path, model, meta: dict[str, Any]) -> None:
    """Weights to model.safetensors and what is needed to rebuild and feed the model to model.json."""
    from safetensors.torch import save_file

    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": MODEL_FORMAT, **weights_record(meta)})
    write_json(run_dir / "model.json", {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **meta})


@dataclass(repr=False)
class Run:
    """A loaded run: the model ready for inference and the metadata beside it."""

    path: Path
    model: Any  # ImageClassifier, in eval mode on the CPU (in a TestTimeAugmentation unless tta is "none")
    meta: ModelMeta
    config: RunConfig
    metrics: Metrics  # an empty record where metrics.json is missing or unreadable (`cnnkit runs` says why)
    tta: str = "none"  # the test-time augmentation `model` applies: the run's recorded one or load_run's tta

    @property
    def classes(self) -> list[str]:
        return list(self.meta.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.meta.input.shape

    @property
    def eval_batch_size(self) -> int:
        """Images per forward pass when this run's model scores images: its recorded --eval-batch-size. A network
        that resizes its input up records a small one (1,000 EfficientNet-Lite2 inputs at 160 px take 12 GB),
        which its evaluate, predict, export and serve then keep to as its training did; a run that recorded none
        gets the default for its model's resolution."""
        recorded = self.config.get("eval_batch_size")
        if type(recorded) is int and recorded >= 1:
            return recorded
        return eval_batch_for(self.meta.model_kwargs.get("resolution"), TrainConfig.eval_batch_size)

    def __repr__(self) -> str:
        accuracy = self.metrics.test_accuracy
        tested = f", test accuracy {accuracy:.4f}" if accuracy is not None else ""
        return (f"Run({str(self.path)!r}: {self.meta.architecture} on {self.meta.dataset}, "
                f"{len(self.classes)} classes, input {self.input_shape}{tested})")


def read_run_metrics(run_dir: Path) -> Metrics:
    """The run's metrics.json as a record; an empty one where it is missing or unreadable.

    The metrics describe a run, they are not needed to use its model: a hand-edited metrics.json must not stop
    `predict` or `serve` (they then show no test figures); `cnnkit report` and `cnnkit runs` name the problem.
    """
    try:
        return read_metrics(run_dir / "metrics.json")
    except (OSError, UnreadableFile):
        return Metrics()


def load_run(path: str | Path, *, tta: str | None = None, trust_code: bool = False, model: Any = None) -> Run:
    """Rebuild a trained model from a run directory (safetensors + JSON, nothing executed).

    The model comes wrapped in the run's test-time augmentation (model.json's `tta`), so evaluate, predict,
    export and serve all use it; `tta` overrides it ("none" gives the bare classifier, e.g. to fine-tune).
    A run whose model is a user's file (`--model FILE.py:FUNCTION`) is the one exception to "nothing
    executed": it loads only with `trust_code=True`, and only from the very file it was trained with
    (same SHA-256). A run of a model given as a Python object needs that object's code: `model=` an
    nn.Module (the network, or its ImageClassifier) or a callable (input_shape, num_classes) -> nn.Module.
    """
    from cnnkit.models.tta import with_tta

    run_dir = resolve_run_dir(path)
    meta = read_model_meta(run_dir)
    model = rebuild_model(run_dir, meta, trust_code=trust_code, model=model)
    weights = run_dir / "model.safetensors"
    state = read_weights(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise CnnkitError(f"{weights}: cannot load weights ({_first_line(error)})") from None
    model.eval()
    config = read_run_config(run_dir)
    metrics = read_run_metrics(run_dir)
    tta = run_tta(run_dir, meta, tta)
    return Run(run_dir, with_tta(model, tta), meta, config, metrics, tta)


def read_run_config(run_dir: Path) -> RunConfig:
    """config.json as its record (an empty one for a run saved without it)."""
    return read_config_record(run_dir / "config.json")


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def rebuild_model(run_dir: Path, meta: ModelMeta, *, trust_code: bool = False, model: Any = None):
    """A fresh ImageClassifier of the run's architecture and preprocessing, checked to fit its weights.

    `meta` is read_model_meta's checked model.json. It must still say what it said when model.safetensors
    was saved, and the model it describes must have exactly the weights' tensors (names and shapes, read
    from the file's header). A registry model is built on the meta device first (shapes only), so a
    model.json that does not describe these weights costs no memory; only a fitting one is built for real.
    """
    from cnnkit.models.user import CUSTOM_PREFIX

    header = read_weights_header(run_dir / "model.safetensors")
    check_recorded(meta, header, run_dir / "model.json")
    registry = model is None and meta.code is None and not meta.architecture.startswith(CUSTOM_PREFIX)
    if registry:
        check_weights_fit(run_dir, skeleton_state(meta, run_dir / "model.json"), header, meta)
    classifier = _built(run_dir, meta, trust_code, model)
    if not registry:
        check_weights_fit(run_dir, classifier.state_dict(), header, meta)
    return classifier


def _built(run_dir: Path, meta: ModelMeta, trust_code: bool, model: Any):
    """The ImageClassifier model.json describes (registry name, user file or the given object), untrained."""
    from cnnkit.models import ImageClassifier, build_model
    from cnnkit.models.user import CUSTOM_PREFIX, build_body, code_for_run, custom_builder_missing, load_function
    from cnnkit.models.user import user_body

    architecture, shape = meta.architecture, meta.input.shape
    mean, std = list(meta.preprocessing.mean), list(meta.preprocessing.std)
    num_classes, kwargs = len(meta.classes), dict(meta.model_kwargs)
    if model is not None:
        body = user_body(model, shape, num_classes, seed=0)
        if isinstance(body, ImageClassifier):
            return body
    elif meta.code is not None:
        code = code_for_run(run_dir, meta, trust_code)
        body = build_body(load_function(code, architecture), shape, num_classes, kwargs, 0,
                          f"{architecture}: {code.function}", code.path)
    elif architecture.startswith(CUSTOM_PREFIX):
        raise custom_builder_missing(run_dir, architecture)
    else:
        try:
            return build_model(architecture, shape, num_classes, mean=mean, std=std, **kwargs)
        except (TypeError, ValueError, RuntimeError, IndexError, ZeroDivisionError, OverflowError) as error:
            raise CnnkitError(f"{run_dir / 'model.json'}: architecture {architecture!r} cannot be built with "
                              f"model_kwargs {json.dumps(kwargs)[:80]} for input {shape} ({_first_line(error)}); "
                              "the file was edited or damaged") from None
    classifier = ImageClassifier(body, mean, std)
    classifier.architecture, classifier.model_kwargs, classifier.input_shape = architecture, kwargs, shape
    return classifier


def check_weights_fit(run_dir: Path, expected: dict[str, Any], header, meta: ModelMeta) -> None:
    """The weights file must hold exactly the tensors `expected` (the model's state dict, real or on the
    meta device), and the standardisation model.json states."""
    from cnnkit.models.transfer import check_keys

    kwargs = f", model_kwargs {json.dumps(meta.model_kwargs)[:80]}" if meta.model_kwargs else ""
    described = (f"model.json describes {meta.architecture!r} with {len(meta.classes)} classes and input "
                 f"{meta.input.text()}{kwargs}")
    check_keys(expected, header.meta_tensors(), str(header.path), ignore=set(),
               hint=f"{described}: it was edited, or the weights belong to another run")
    if {"rescale.scale", "rescale.offset"} <= set(header.shapes):
        check_standardisation(meta, header.tensor("rescale.scale"), header.tensor("rescale.offset"),
                              run_dir / "model.json", header.path)


def run_tta(run_dir: Path, meta: ModelMeta, tta: str | None) -> str:
    """The TTA a loaded run applies: `tta` when given, else model.json's; refused where it would mirror digits.

    Runs from before model.json recorded `mirror_ok` and `flip` get the dataset's property and no flip.
    """
    from cnnkit.models.tta import check_tta

    chosen = meta.tta if tta is None else tta
    safe = meta.mirror_ok
    if safe is None:
        safe = mirror_ok(meta.dataset, meta.input.channels)
    check_tta(chosen, safe, meta.flip is True, f"{run_dir} (trained on {meta.dataset})")
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Where a run's data was: config.json records data_dir as the user typed it


def recorded_data_dirs(run_dir: str | Path, config: RunConfig) -> list[tuple[Path, str]]:
    """The folders config.json's `data_dir` may name, each with a few words on how it was resolved.

    An absolute (or ~) path is itself. A relative one was typed relative to the directory training ran
    in, which is unknown; it is tried first from the current directory, then from the training directory
    inferred from the run's location (the run lives in <training dir>/<runs_dir>/<name>, and config.json
    records runs_dir as typed too). Empty when no data_dir was recorded.
    """
    recorded = config.data_dir
    if recorded is None or not recorded.strip():
        return []
    typed = Path(recorded).expanduser()
    what = f"the run's config.json data_dir {recorded!r}"
    if typed.is_absolute():
        return [(typed, what)]
    found = [((Path.cwd() / typed).resolve(), f"{what}, relative, taken from the current directory")]
    trained_in = _training_dir(Path(run_dir), config.runs_dir)
    if trained_in is not None and trained_in != Path.cwd().resolve():
        where = f"{what}, relative, taken from {trained_in} where the run was trained"
        found.append(((trained_in / typed).resolve(), where))
    return found


def _training_dir(run_dir: Path, runs_dir: Any) -> Path | None:
    """The directory training ran in, if the run still sits at <that dir>/<runs_dir>/<name>."""
    if not isinstance(runs_dir, str) or not runs_dir.strip() or Path(runs_dir).expanduser().is_absolute():
        return None
    parts = Path(os.path.normpath(runs_dir)).parts
    parent = Path(run_dir).resolve().parent
    if parts == (".",):
        return parent
    if ".." in parts or parent.parts[-len(parts):] != parts:
        return None  # the run was moved (or runs_dir climbs out): the training directory is unknown
    return Path(*parent.parts[: -len(parts)])


# ---------------------------------------------------------------------------------------------------------
# Listing a runs folder


@dataclass
class RunSummary:
    """One row of `cnnkit runs`: what a run was and how it did; None where a field could not be read."""

    name: str
    path: Path
    dataset: str | None = None
    model: str | None = None
    preset: str | None = None  # the named recipe the run started from, None when it used none
    epochs: int | None = None
    test_accuracy: float | None = None
    train_seconds: float | None = None
    date: datetime.datetime | None = None  # when the run finished: its metrics.json (else the folder) mtime
    problem: str | None = None  # why this directory is not a complete run, or None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["date"] = self.date.isoformat(timespec="seconds") if self.date else None
        return data


def list_runs(runs_dir: str | Path) -> list[RunSummary]:
    """Summaries of the run directories in `runs_dir`, newest first.

    Hidden directories and plain files are skipped, except the staging directory of a training that
    stopped after a checkpoint: it is listed as unfinished, with the command that resumes it. A
    directory that is not a complete run is listed with what could be read and `problem` set,
    never an exception. A missing `runs_dir` is a CnnkitError.
    """
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        what = "is not a folder" if runs_dir.exists() else "does not exist"
        raise CnnkitError(f"{runs_dir}: {what}; runs are written to --runs-dir (default: runs) by `cnnkit train`")
    try:
        entries = list(runs_dir.iterdir())
    except OSError as error:
        raise CnnkitError(f"{runs_dir}: cannot list ({error.strerror or error})") from None
    summaries = [summarize_run(path) for path in entries if not path.name.startswith(".") and _is_dir(path)]
    summaries += [summarize_unfinished(path) for path in entries if is_unfinished_run(path)]
    oldest = datetime.datetime.min.replace(tzinfo=datetime.timezone.utc)
    return sorted(summaries, key=lambda run: (run.date or oldest, run.name), reverse=True)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def summarize_run(run_dir: str | Path) -> RunSummary:
    """Read one run directory's metrics.json, config.json and model.json into a RunSummary (never raises)."""
    run_dir = Path(run_dir)
    summary = RunSummary(name=run_dir.name, path=run_dir)
    problems: list[str] = []
    metrics = _read_or_note(read_metrics, run_dir / "metrics.json", problems, Metrics())
    config = _read_or_note(_existing(read_config_record), run_dir / "config.json", problems, RunConfig())
    meta = _read_or_note(lambda path: read_model_meta(path.parent), run_dir / "model.json", problems, None)
    summary.dataset = _first_str(metrics.dataset, meta and meta.dataset, config.dataset)
    summary.model = _first_str(metrics.model, config.model, meta and meta.architecture)
    summary.preset = _first_str(metrics.preset, config.preset)
    summary.epochs = _number(metrics.epochs, int)
    summary.test_accuracy = _number(metrics.test_accuracy, float)
    summary.train_seconds = _number(metrics.train_seconds, float)
    for source in (run_dir / "metrics.json", run_dir):
        try:
            stamp = source.stat().st_mtime
        except OSError:
            continue
        summary.date = datetime.datetime.fromtimestamp(stamp, tz=datetime.timezone.utc).astimezone()
        break
    if not (run_dir / "model.safetensors").is_file() and not problems:
        problems.append("no model.safetensors")
    summary.problem = "; ".join(problems) or None
    return summary


def is_unfinished_run(path: Path) -> bool:
    """A training's staging directory (`.NAME.partial-*`) holding a checkpoint: resumable work."""
    from cnnkit.engine.checkpoint import CHECKPOINT_JSON

    return path.name.startswith(".") and ".partial-" in path.name and (path / CHECKPOINT_JSON).is_file()


def summarize_unfinished(path: Path) -> RunSummary:
    """An unfinished run as read from its checkpoint.json (never raises)."""
    from cnnkit.engine.checkpoint import CHECKPOINT_JSON, planned_epochs, read_checkpoint_document

    problems: list[str] = []
    try:
        state = read_checkpoint_document(path)["state"]
    except CnnkitError as error:
        state = {}
        problems.append(str(error))
    recorded = state.get("meta", {}).get("config")
    config = RunConfig(recorded if isinstance(recorded, dict) else {})  # its typed properties check each value
    name = path.name[1:].split(".partial-")[0]
    summary = RunSummary(name=f"{name} (unfinished)", path=path, dataset=config.dataset, model=config.model,
                         preset=config.preset, epochs=_number(state.get("epoch"), int))
    with contextlib.suppress(OSError):
        stamp = (path / CHECKPOINT_JSON).stat().st_mtime
        summary.date = datetime.datetime.fromtimestamp(stamp, tz=datetime.timezone.utc).astimezone()
    planned = _number(planned_epochs(state, config.epochs), int)
    summary.problem = "; ".join(problems) or (f"unfinished: stopped after epoch {summary.epochs} of {planned}; "
                                              f"continue with: cnnkit train --resume {path}")
    return summary


def _read_or_note(read: Callable[[Path], Any], path: Path, problems: list[str], empty: Any) -> Any:
    """`read(path)` (a run file as its record), or `empty` with why in `problems`: the runs listing shows
    every run, whatever one run's files hold."""
    try:
        return read(path)
    except (OSError, CnnkitError) as error:
        problems.append(_unread(path, error))
        return empty


def _unread(path: Path, error: Exception) -> str:
    """Why a run file could not be read, in a few words for the runs listing."""
    if isinstance(error, FileNotFoundError):
        return f"no {path.name}"
    if isinstance(error, CnnkitError):
        reason = str(error).removeprefix(f"{path}: ")
        return f"{path.name} is not valid JSON" if reason.startswith("not valid JSON") else f"{path.name}: {reason}"
    return f"{path.name} is not readable"


def _existing(read: Callable[[Path], Any]) -> Callable[[Path], Any]:
    """`read`, after FileNotFoundError for a missing file (config.json's reader takes a missing file as empty)."""
    def checked(path: Path) -> Any:
        if not path.exists():
            raise FileNotFoundError(path)
        return read(path)
    return checked


def _first_str(*values: Any) -> str | None:
    return next((value for value in values if isinstance(value, str) and value), None)


def _number(value: Any, kind: type) -> Any:
    """`value` as int or float when it is a finite number (JSON booleans are not numbers), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    if kind is int and value != int(value):
        return None
    return kind(value)

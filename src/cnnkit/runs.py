"""The run directory: everything one training produced, saved so it loads with no other input.

Layout of RUNS_DIR/NAME/: config.json, history.csv, metrics.json, model.safetensors, model.json,
history.png, confusion_matrix.png, errors.png. A run is assembled in a hidden staging directory and
renamed into place only when complete, so an interrupted training leaves no half-written run.
Weights are safetensors and metadata JSON: loading a run never executes code from its files.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_path, current_umask, write_text

MODEL_FORMAT = "cnnkit.model"
MODEL_FORMAT_VERSION = 1
DEFAULT_RUN_NAME = "train"


def next_run_name(runs_dir: Path, base: str = DEFAULT_RUN_NAME) -> str:
    """train, train2, train3, ...: the first name not taken in `runs_dir`."""
    taken = {p.name for p in runs_dir.iterdir()} if runs_dir.is_dir() else set()
    if base not in taken:
        return base
    numbers = [int(m.group(1)) for name in taken if (m := re.fullmatch(re.escape(base) + r"(\d+)", name))]
    return f"{base}{max([1, *numbers]) + 1}"


def check_run_name(runs_dir: Path, name: str) -> None:
    if name.startswith(".") or "/" in name or name in ("", ".."):
        raise CnnkitError(f"--name {name!r} is not a valid run name")
    if (runs_dir / name).exists():
        raise CnnkitError(f"run directory {runs_dir / name} already exists; choose another --name")


@contextlib.contextmanager
def staged_run(runs_dir: str | Path, name: str | None) -> Iterator[tuple[Path, list[Path]]]:
    """Yield (staging_dir, [final_dir]); the staging dir becomes the final run dir on success.

    The final name is picked at commit time when `name` is None, so two trainings started together
    never write into the same directory.
    """
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    if name is not None:
        check_run_name(runs_dir, name)
    staging = Path(tempfile.mkdtemp(prefix=f".{name or DEFAULT_RUN_NAME}.partial-", dir=runs_dir))
    os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700
    final: list[Path] = []
    try:
        yield staging, final
        final.append(_commit(staging, runs_dir, name))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CnnkitError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CnnkitError(f"{path}: not valid JSON ({error})") from None


def save_model(run_dir: Path, model, meta: dict[str, Any]) -> None:
    """Weights to model.safetensors and what is needed to rebuild and feed the model to model.json."""
    from safetensors.torch import save_file

    state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    with atomic_path(run_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": MODEL_FORMAT})
    write_json(run_dir / "model.json", {"format": MODEL_FORMAT, "format_version": MODEL_FORMAT_VERSION, **meta})


@dataclass
class Run:
    """A loaded run: the model ready for inference and the metadata beside it."""

    path: Path
    model: Any  # ImageClassifier, in eval mode on the CPU
    meta: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        spec = self.meta["input"]
        return int(spec["channels"]), int(spec["height"]), int(spec["width"])


def resolve_run_dir(path: str | Path) -> Path:
    """A run directory, or a model.json inside one."""
    path = Path(path)
    if path.is_file() and path.name == "model.json":
        path = path.parent
    if not (path / "model.json").is_file():
        raise CnnkitError(f"{path}: not a cnnkit run directory (no model.json)")
    return path


def load_run(path: str | Path) -> Run:
    """Rebuild a trained model from a run directory (safetensors + JSON, nothing executed)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cnnkit.models import build_model

    run_dir = resolve_run_dir(path)
    meta = read_json(run_dir / "model.json")
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise CnnkitError(f"{run_dir / 'model.json'}: not a cnnkit model description")
    if meta.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise CnnkitError(f"{run_dir / 'model.json'}: made by a newer cnnkit (format {meta['format_version']})")
    try:
        spec = meta["input"]
        model = build_model(meta["architecture"], (spec["channels"], spec["height"], spec["width"]),
                            len(meta["classes"]), mean=meta["preprocessing"]["mean"],
                            std=meta["preprocessing"]["std"], **meta.get("model_kwargs", {}))
    except (KeyError, TypeError) as error:
        raise CnnkitError(f"{run_dir / 'model.json'}: missing or bad field {error}") from None
    weights = run_dir / "model.safetensors"
    try:
        state = load_file(str(weights))
        model.load_state_dict(state, strict=True)
    except FileNotFoundError:
        raise CnnkitError(f"{weights}: file not found") from None
    except (SafetensorError, RuntimeError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CnnkitError(f"{weights}: cannot load weights ({first_line})") from None
    model.eval()
    config = read_json(run_dir / "config.json") if (run_dir / "config.json").is_file() else {}
    metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    return Run(run_dir, model, meta, config, metrics)

"""A user's own model: a Python object through the API, or `--model path/to/file.py:FUNCTION` on the CLI.

FUNCTION(input_shape, num_classes, **model_kwargs) returns an nn.Module (the network body: float images
in, logits out); cnnkit wraps it in an ImageClassifier, so the preprocessing travels inside it as for the
built-in models. A run made this way records the file's path, its SHA-256 and a copy of its text
(model_source.py). Loading such a run executes that code, which loading a run otherwise never does
(weights are safetensors, metadata JSON), so it needs an explicit opt-in (`--trust-code`,
`trust_code=True`) and the very file that trained it (same SHA-256).
"""

from __future__ import annotations

import ast
import hashlib
import re
import sys
import traceback
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.errors import CnnkitError

#: FILE.py:FUNCTION, FUNCTION a Python identifier.
FILE_SPEC = re.compile(r"^(?P<path>.+\.py):(?P<function>[A-Za-z_][A-Za-z0-9_]*)$")
#: The copy of the code kept in the run directory.
SOURCE_COPY = "model_source.py"
#: model.json's architecture for a model given as a Python object: custom:<class name>.
CUSTOM_PREFIX = "custom:"

ModelMaker = nn.Module | Callable[..., nn.Module]


def parse_file_spec(spec: str) -> tuple[Path, str] | None:
    """(path, function) of a FILE.py:FUNCTION value; None for anything else (a registry name)."""
    match = FILE_SPEC.match(spec)
    return (Path(match["path"]).expanduser(), match["function"]) if match else None


def looks_like_file_spec(spec: str) -> bool:
    """Whether `spec` is meant as FILE.py:FUNCTION (so errors talk about files, not registry names)."""
    return ".py:" in spec or spec.endswith(".py")


def check_file_spec(spec: str) -> str | None:
    """What is wrong with a FILE.py:FUNCTION value, found without running the file; None when fine.

    The file is parsed, not executed: the function must be defined (def, class, assignment or import) at
    its top level.
    """
    parsed = parse_file_spec(spec)
    if parsed is None:
        return (f"{spec!r} is neither a registered model nor FILE.py:FUNCTION (e.g. mynet.py:build, a function "
                "(input_shape, num_classes, **model_kwargs) returning an nn.Module)")
    path, function = parsed
    if not path.is_file():
        return f"{spec!r}: file {path} not found"
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError) as error:
        return f"{spec!r}: cannot read {path} as Python ({type(error).__name__}: {error})"
    if function not in top_level_names(tree):
        return f"{spec!r}: {path} defines no top-level {function!r}"
    return None


def top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


@dataclass(frozen=True)
class UserCode:
    """The exact text of a model file, read once: what is hashed is what runs and what the run keeps."""

    path: Path  # absolute
    function: str
    source: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source).hexdigest()

    def record(self) -> dict[str, str]:
        """model.json's `code`."""
        return {"path": str(self.path), "sha256": self.sha256, "function": self.function, "copy": SOURCE_COPY}


def read_code(spec: str) -> UserCode:
    if problem := check_file_spec(spec):
        raise CnnkitError(f"--model {problem}")
    path, function = parse_file_spec(spec)  # type: ignore[misc]
    return UserCode(path.resolve(), function, path.read_bytes())


def verified_code(spec: str, record: Any, trust_code: bool, what: str) -> UserCode:
    """FILE.py:FUNCTION's code for continuing from earlier weights (`--resume`, `--init`): the opt-in is given and
    the file is the one `record` (a run's or checkpoint's `code` record) names by its SHA-256.

    Resuming or fine-tuning runs the file as it is now; an edit that keeps tensor shapes would otherwise train
    on silently (measured: exit 0, test accuracy 0.085), so the same rule as `evaluate`/`predict` applies.
    """
    code = read_code(spec)
    if not trust_code:
        raise CnnkitError(f"{what}: its model is built by {code.function}() in {code.path}, and continuing it runs "
                          "that code; if you trust it, add --trust-code (Python: trust_code=True)")
    expected = record.get("sha256") if isinstance(record, dict) else None
    if not isinstance(expected, str):
        raise CnnkitError(f"{what}: records no SHA-256 of {code.path} (written by an earlier cnnkit), so the file "
                          "cannot be checked; start a new run")
    if expected != code.sha256:
        raise CnnkitError(f"{what}: {code.path} has changed since (sha256 {code.sha256[:12]}..., recorded "
                          f"{expected[:12]}...); restore that file")
    return code


def load_function(code: UserCode, label: str) -> Callable[..., Any]:
    """Execute the file's text (a fresh module, not an import: nothing cached) and return FUNCTION."""
    name = f"cnnkit_user_model_{code.sha256[:16]}"
    module = types.ModuleType(name)
    module.__file__ = str(code.path)
    sys.modules[name] = module  # dataclasses and pickling-free introspection look the module up
    try:
        exec(compile(code.source, str(code.path), "exec"), module.__dict__)  # noqa: S102 - the user's own model
    except (Exception, SystemExit) as error:  # noqa: BLE001 - whatever the file raises becomes one line naming it
        sys.modules.pop(name, None)
        raise CnnkitError(f"{label}: running {code.path} failed: {describe(error, code.path)}") from None
    function = getattr(module, code.function, None)
    if not callable(function):
        raise CnnkitError(f"{label}: {code.path} has no function {code.function!r} after running it")
    return function


def describe(error: BaseException, path: Path | None = None) -> str:
    """One line: the exception, its first message line, and where in the user's file it was raised."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    where = ""
    frames = traceback.extract_tb(error.__traceback__)
    if isinstance(error, SyntaxError) and error.lineno:
        where = f" (line {error.lineno})"
    elif path is not None:
        own = [frame for frame in frames if Path(frame.filename) == path]
        if own:
            where = f" (at {path.name} line {own[-1].lineno})"
    return f"{type(error).__name__}{': ' + text if text else ''}{where}"


def build_body(maker: Callable[..., Any], input_shape: Sequence[int], num_classes: int, kwargs: dict[str, Any],
               seed: int | None, label: str, path: Path | None = None) -> nn.Module:
    """maker(input_shape, num_classes, **kwargs), drawn from `seed` like build_model, checked to be a Module."""
    shape = tuple(int(v) for v in input_shape)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            body = maker(shape, num_classes, **kwargs)
        except (Exception, SystemExit) as error:  # noqa: BLE001 - the user's code: report it in one line
            raise CnnkitError(f"{label}({shape}, {num_classes}{''.join(f', {k}={v!r}' for k, v in kwargs.items())}) "
                              f"raised {describe(error, path)}") from None
    if not isinstance(body, nn.Module):
        raise CnnkitError(f"{label} returned {type(body).__name__}, not a torch.nn.Module")
    return body


def check_classifier(model: nn.Module, input_shape: Sequence[int], num_classes: int, label: str,
                     path: Path | None = None) -> None:
    """A user's network, tried once before any data is spent on it: it has parameters to train, its forward runs
    on two images of the input shape and gives (2, num_classes) logits. Otherwise training would fail at its
    first step, or (wrong logit count) only in plotting after the whole training, and a resume would repeat it.
    """
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise CnnkitError(f"{label}: the network has no trainable parameters; give it layers with weights")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            device = next(model.parameters()).device  # an API user's module may already sit on a GPU
            logits = model(torch.zeros((2, *input_shape), dtype=torch.uint8, device=device))
    except (Exception, SystemExit) as error:  # noqa: BLE001 - the user's code: report it in one line
        raise CnnkitError(f"{label}: its forward pass on a batch of shape {(2, *input_shape)} raised "
                          f"{describe(error, path)}") from None
    finally:
        model.train(was_training)
    shape = tuple(getattr(logits, "shape", ()))
    if not isinstance(logits, torch.Tensor) or shape != (2, num_classes):
        got = f"shape {shape}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise CnnkitError(f"{label}: its forward pass must return logits of shape (batch, {num_classes}), one per "
                          f"class; it returned {got}")


def user_body(model: ModelMaker, input_shape: Sequence[int], num_classes: int, seed: int | None) -> nn.Module:
    """The network of a model given through the API: the module itself, or what a class/function builds."""
    if isinstance(model, nn.Module):
        return model
    if not callable(model):
        raise CnnkitError(f"model must be a registered name, FILE.py:FUNCTION, an nn.Module, or a callable "
                          f"(input_shape, num_classes) -> nn.Module; got {type(model).__name__}")
    label = getattr(model, "__qualname__", type(model).__name__)
    return build_body(model, input_shape, num_classes, {}, seed, label)


# ---------------------------------------------------------------------------------------------------------
# Loading a run whose model is code


def code_for_run(run_dir: Path, meta: Any, trust_code: bool) -> UserCode:
    """The recorded model file, verified: the opt-in is given and the text has the recorded SHA-256.

    The file at the recorded path is used when it exists (it must be unchanged: an edited file is
    refused, never silently replaced); when it is gone, the run's own copy model_source.py.
    """
    record = meta.code  # meta: the run's model_meta.ModelMeta (a layer above this module)
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("path", "sha256", "function")):
        raise CnnkitError(f"{run_dir / 'model.json'}: architecture {meta.architecture!r} needs a `code` "
                          "record (path, sha256, function)")
    path, function, expected = Path(record["path"]), record["function"], record["sha256"]
    if not trust_code:
        raise CnnkitError(f"{run_dir}: its model is built by {function}() in {path}, and loading the run runs that "
                          "code; if you trust it, add --trust-code (Python: trust_code=True)")
    copy = run_dir / str(record.get("copy") or SOURCE_COPY)
    source_path = path if path.is_file() else copy
    if not source_path.is_file():
        raise CnnkitError(f"{run_dir}: the model code is gone: neither {path} nor the run's copy {copy} exists")
    source = source_path.read_bytes()
    found = hashlib.sha256(source).hexdigest()
    if found != expected:
        raise CnnkitError(f"{run_dir}: {source_path} has changed since the run was trained (sha256 {found[:12]}..., "
                          f"recorded {expected[:12]}...); restore that file (or move it away to use the run's "
                          f"copy {copy.name})")
    return UserCode(source_path.resolve(), function, source)


def custom_builder_missing(run_dir: Path, architecture: str) -> CnnkitError:
    name = architecture[len(CUSTOM_PREFIX):]
    return CnnkitError(f"{run_dir}: its model was a Python object ({name}) that a run cannot rebuild by itself; "
                       f"pass it: cnnkit.load_run(path, model={name}(...)) or model=<a function (input_shape, "
                       "num_classes) -> nn.Module>")

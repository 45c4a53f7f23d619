"""Resumable checkpoints: all that fit() needs to go on exactly where a run stopped, with no pickle.

A checkpoint is two files in the run's (staging) directory: `checkpoint-EPOCH.safetensors` holds every
tensor (weights, optimizer moments, EMA average, the kept best weights, RNG states) and `checkpoint.json`
holds everything else (epoch, step, history, callbacks' counters, the run's config) with each tensor
replaced by a reference {"__tensor__": key}. The JSON file is written last and names its tensor file, so
the rename of the JSON file is the commit: a kill at any moment leaves either the previous consistent pair
or the new one, never a mix. Loading reads safetensors and JSON only, so it never runs code from the files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from cnnkit.data.disk import DiskImages
from cnnkit.errors import CnnkitError
from cnnkit.fileio import UnreadableFile, atomic_path, read_json, read_weights, write_text

CHECKPOINT_JSON = "checkpoint.json"
CHECKPOINT_FORMAT = "cnnkit.checkpoint"
CHECKPOINT_VERSION = 1
TENSOR_REF = "__tensor__"
_TENSOR_FILE = re.compile(r"checkpoint-(\d+)\.safetensors")


# ----------------------------------------------------------------------------------------------------
# Nested state <-> (JSON, flat tensors)


def split_tensors(value: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """`value` with every tensor moved into `tensors` (under its path) and replaced by a reference.

    Dicts, lists and tuples are walked (tuples come back as lists); keys become strings, as JSON needs.
    """
    if isinstance(value, torch.Tensor):
        key = path or "value"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared memory
        return {TENSOR_REF: key}
    if isinstance(value, dict):
        return {str(k): split_tensors(v, tensors, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [split_tensors(v, tensors, f"{path}.{i}" if path else str(i)) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}  # nan/inf: JSON has no literal
    raise TypeError(f"cannot checkpoint a {type(value).__name__} at {path or 'the top'}")


def join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of split_tensors: references replaced by their tensors."""
    if isinstance(value, dict):
        if set(value) == {TENSOR_REF}:
            key = value[TENSOR_REF]
            if key not in tensors:
                raise KeyError(key)
            return tensors[key]
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: join_tensors(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [join_tensors(v, tensors) for v in value]
    return value


def int_keys(mapping: dict[str, Any]) -> dict[int, Any]:
    """JSON made the optimizer's integer parameter ids strings; PyTorch wants them back as ints."""
    return {int(key): value for key, value in mapping.items()}


# ----------------------------------------------------------------------------------------------------
# Files


def write_checkpoint(directory: Path, state: dict[str, Any]) -> Path:
    """Write `state` (nested, with tensors anywhere; it must have "epoch") as the directory's checkpoint."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    document = split_tensors(state, tensors)
    epoch = int(state["epoch"])
    tensor_name = f"checkpoint-{epoch:04d}.safetensors"
    with atomic_path(directory / tensor_name) as tmp:
        save_file(tensors, str(tmp), metadata={"format": CHECKPOINT_FORMAT})
    write_text(directory / CHECKPOINT_JSON, json.dumps(
        {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, "tensors": tensor_name,
         "state": document}, indent=1) + "\n")
    for old in directory.glob("checkpoint-*.safetensors"):  # the previous epoch's, or one a kill left behind
        if old.name != tensor_name and _TENSOR_FILE.fullmatch(old.name):
            old.unlink(missing_ok=True)
    return directory / CHECKPOINT_JSON


def has_checkpoint(directory: Path) -> bool:
    return (directory / CHECKPOINT_JSON).is_file()


def read_checkpoint(directory: Path) -> dict[str, Any]:
    """The state write_checkpoint saved, tensors in place (on the CPU); a clear error for anything else."""
    path = directory / CHECKPOINT_JSON
    document = read_checkpoint_document(directory)
    name = document["tensors"]
    tensors = read_weights(directory / name)
    try:
        state = join_tensors(document["state"], tensors)
    except KeyError as error:
        raise CnnkitError(f"{path}: refers to tensor {error} that {name} lacks") from None
    return state


#: checkpoint.json grows ~5 kB an epoch (the History and its step points): room for 100,000 epochs.
CHECKPOINT_JSON_BYTES = 512 << 20


def read_checkpoint_document(directory: Path) -> dict[str, Any]:
    """checkpoint.json alone, checked (format, version, tensor file, epoch and step), tensors still as
    references: enough to learn a run's epoch and options without loading its tensors."""
    path = directory / CHECKPOINT_JSON
    try:
        document = read_json(path, CHECKPOINT_JSON_BYTES)
    except FileNotFoundError:
        raise CnnkitError(f"{directory}: no checkpoint here ({CHECKPOINT_JSON} missing)") from None
    except UnreadableFile as error:
        raise CnnkitError(f"not a readable checkpoint: {error}") from None
    except OSError as error:
        raise CnnkitError(f"{path}: not a readable checkpoint ({error.strerror or error})") from None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise CnnkitError(f"{path}: not a cnnkit checkpoint")
    if document.get("format_version") != CHECKPOINT_VERSION:
        raise CnnkitError(f"{path}: checkpoint format version {document.get('format_version')!r} is not "
                          f"{CHECKPOINT_VERSION}; resume it with the cnnkit version that wrote it")
    name = document.get("tensors")
    if not isinstance(name, str) or not _TENSOR_FILE.fullmatch(name):
        raise CnnkitError(f"{path}: names no valid tensor file")
    state = document.get("state")
    if not isinstance(state, dict) or not _whole(state.get("epoch")) or not _whole(state.get("step")):
        raise CnnkitError(f"{path}: lacks the epoch and step it was written at")
    if not isinstance(state.get("meta", {}), dict):
        raise CnnkitError(f"{path}: its meta is not an object")
    return document


def read_training_checkpoint(directory: Path) -> dict[str, Any]:
    """The state of a fit() that Checkpoint saved (read_checkpoint), its every entry checked first: a
    hand-edited checkpoint.json is one line naming the entry, before any tensor is loaded."""
    document = read_checkpoint_document(directory)
    if problem := _state_problem(document["state"]):
        raise CnnkitError(f"{directory / CHECKPOINT_JSON}: {problem}; the file was edited or damaged (start a new "
                          "run, or restore it)")
    return read_checkpoint(directory)


#: The entries of a checkpoint's state and the JSON type each must have (tensors are {"__tensor__": key} objects).
STATE_TYPES = {"epoch": int, "step": int, "stop_training": bool, "model": dict, "optimizer": dict,
               "torch_rng": dict, "callbacks": dict, "meta": dict}


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _state_problem(state: dict[str, Any]) -> str | None:
    """What is wrong with a checkpoint's state, checked once where it is read (the rest of training trusts it)."""
    for key, kind in STATE_TYPES.items():
        if key not in state:
            return f"its state lacks {key!r}"
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            return f"its state's {key!r} is {type(state[key]).__name__}, not {kind.__name__}"
    if not 1 <= state["epoch"] <= 1_000_000:
        return f"its epoch {state['epoch']} is not a completed epoch (1 or more)"
    if state["step"] < state["epoch"]:
        return f"its step {state['step']} is fewer than one per completed epoch ({state['epoch']})"
    optimizer = state["optimizer"]
    if not isinstance(optimizer.get("state"), dict) or not isinstance(optimizer.get("param_groups"), list):
        return "its optimizer state lacks 'state' and 'param_groups'"
    history = state["callbacks"].get("History")
    if history is not None:
        epochs = history.get("epoch") if isinstance(history, dict) else None
        if epochs != list(range(1, state["epoch"] + 1)):
            return f"its History does not hold epochs 1 to {state['epoch']}"
        columns = history.get("history")
        if not isinstance(columns, dict) or any(not isinstance(values, list) or len(values) != state["epoch"]
                                                for values in columns.values()):
            return f"its History columns do not each hold {state['epoch']} values"
    return None


@contextlib.contextmanager
def restoring(what: str) -> Iterator[None]:
    """Turn a checkpoint state that does not fit the model or optimizer (a tensor of another shape, a missing
    entry) into one line: load_state_dict and set_rng_state report these as RuntimeError, KeyError, ..."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        reason = " ".join(str(error).split())[:300]
        raise CnnkitError(f"{what}: the checkpoint does not fit this run's model and optimizer "
                          f"({type(error).__name__}: {reason}); it was edited or damaged: start a new run") from None


def check_resumed_position(state: Any, saved: dict[str, Any]) -> None:
    """A restored fit() is where its checkpoint says, in this run's terms: a completed epoch of those planned,
    and one step per batch of each (an edited epoch of -3 or 100 was saved as a finished run before)."""
    epoch, step = saved["epoch"], saved["step"]
    if epoch > state.epochs and not saved["stop_training"]:
        raise CnnkitError(f"resume: the checkpoint is after epoch {epoch}, beyond the {state.epochs} epochs this run "
                          "trains; it was edited or damaged: start a new run")
    if step != epoch * state.steps_per_epoch:
        raise CnnkitError(f"resume: the checkpoint records {step} steps after epoch {epoch}, not the "
                          f"{epoch * state.steps_per_epoch} this run's batches make; it was edited or damaged, or "
                          "the run's data differs: start a new run")


def remove_checkpoint(directory: Path) -> None:
    """Delete a finished run's checkpoint files: the run directory then holds only its results."""
    (directory / CHECKPOINT_JSON).unlink(missing_ok=True)
    for old in directory.glob("checkpoint-*.safetensors"):
        old.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# What a resumed run must match


def data_fingerprint(*arrays: torch.Tensor | DiskImages) -> str:
    """SHA-256 over the bytes of the given tensors (labels and images of each split), in order.

    A resumed run refuses data that differs from the data it started with: continuing on other images
    would produce a model that matches neither run. Hashing 50k CIFAR-10-sized images takes 0.27 s here
    (2 cores), so it is done only for runs that checkpoint or resume. Images on disk are hashed one chunk
    at a time, to the same digest as the same images in memory.
    """
    digest = hashlib.sha256()
    for array in arrays:
        if isinstance(array, DiskImages):
            digest.update(str((tuple(array.shape), str(array.dtype))).encode())
            for block in array.blocks():
                digest.update(block)
            continue
        tensor = array.detach().cpu().contiguous()
        digest.update(str((tuple(tensor.shape), str(tensor.dtype))).encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# fit()'s state


def named_callbacks(callbacks: list[Any]) -> dict[str, Any]:
    """Callbacks by class name (History, EMA, ...), a second of one class as 'Name#2', in hook order."""
    named: dict[str, Any] = {}
    for callback in callbacks:
        name, count = type(callback).__name__, 1
        while (name if count == 1 else f"{name}#{count}") in named:
            count += 1
        named[name if count == 1 else f"{name}#{count}"] = callback
    return named


def capture_training(state: Any, meta: dict[str, Any]) -> dict[str, Any]:
    """Everything a TrainState-driven fit() needs to continue after the current epoch, bit for bit on a CPU.

    RNG states: the generator of shuffling and augmentation, and torch's global generators (dropout and any
    layer that draws without a generator), CPU and CUDA.
    """
    return {
        "epoch": state.epoch,
        "step": state.step,
        "stop_training": state.stop_training,
        "model": state.model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "generator": state.generator.get_state() if state.generator is not None else None,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "callbacks": {name: callback.state_dict() for name, callback in named_callbacks(state.callbacks).items()},
        "meta": meta,
    }


def planned_epochs(saved: dict[str, Any], configured: Any) -> Any:
    """The epochs a checkpointed run will end at: its time budget's plan (TimeBudget) when one was made, else
    the configured count (returned as given, even when missing or odd: callers report what is there)."""
    plan = saved.get("callbacks", {}).get("TimeBudget", {}) if isinstance(saved.get("callbacks"), dict) else {}
    planned = plan.get("planned") if isinstance(plan, dict) else None
    return planned if isinstance(planned, int) and not isinstance(planned, bool) else configured


def match_param_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded moment tensor its parameter's memory layout (channels_last kernels stay so).

    Loading makes them contiguous, and PyTorch's fused AdamW walks parameter and moment memory in step:
    a channels_last kernel beside a contiguous moment gets the wrong elements' moments (measured on torch
    2.13 CPU: 0.016 off after one step at lr 0.1, where foreach and fused with matching layouts agree
    exactly; the resumed run diverged at its first step until this was added).
    """
    for parameter, values in optimizer.state.items():
        for key, value in values.items():
            if (isinstance(value, torch.Tensor) and value.shape == parameter.shape
                    and value.stride() != parameter.stride()):
                values[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def restore_training(state: Any, saved: dict[str, Any]) -> None:
    """Put a captured state back into a fit() whose callbacks have had on_train_begin (the model already loaded)."""
    optimizer = saved["optimizer"]
    state.optimizer.load_state_dict({"state": int_keys(optimizer["state"]), "param_groups": optimizer["param_groups"]})
    match_param_layout(state.optimizer)
    if state.generator is not None and saved.get("generator") is not None:
        state.generator.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    if saved.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    state.step, state.initial_epoch, state.stop_training = saved["step"], saved["epoch"], saved["stop_training"]
    states = saved.get("callbacks", {})
    for name, callback in named_callbacks(state.callbacks).items():
        if name in states:
            callback.load_state_dict(states[name])


def checkpoint_epoch(staging: Path) -> int | None:
    """The epoch of the staging directory's checkpoint, or None if it has none or it cannot be read."""
    try:
        return read_checkpoint_document(staging)["state"]["epoch"]
    except CnnkitError:
        return None

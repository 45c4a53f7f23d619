"""Starting weights other than random: an earlier run (`--init RUN`) or a safetensors file (`--weights FILE`).

`--init` is transfer learning: the same architecture, its weights loaded, and when the classes differ a
freshly initialised head (the last nn.Linear) in place of the old one, so everything the earlier run
learned below the head carries over. The new model keeps the earlier run's input standardisation, because
its features were learned on inputs scaled that way. `--weights` loads a state dict that must match the
architecture exactly. Both read safetensors only (never pickle) and run none of the earlier run's code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cnnkit.errors import CnnkitError
from cnnkit.models.classifier import ImageClassifier, Rescaling, head_state_keys
from cnnkit.models.user import parse_file_spec
from cnnkit.fileio import file_sha256, read_weights
from cnnkit.model_meta import ModelMeta, read_model_meta, resolve_run_dir

#: How many offending keys a mismatch error names.
SHOWN_KEYS = 3


# ---------------------------------------------------------------------------------------------------------
# --init RUN


def init_meta(run: str | Path, architecture: str, model_kwargs: dict[str, Any]) -> tuple[Path, ModelMeta]:
    """(run directory, its model.json), checked to be of the architecture about to be built."""
    run_dir = resolve_run_dir(run)
    meta = read_model_meta(run_dir)
    theirs = meta.architecture
    if not same_architecture(meta, architecture):
        kwargs = meta.model_kwargs
        hint = f"--model {theirs}" + (f" --model-kwargs '{json.dumps(kwargs)}'" if kwargs else "")
        raise CnnkitError(f"--init {run}: that run's model is {theirs!r} and this one's is {architecture!r}; "
                          f"fine-tuning needs the same architecture ({hint})")
    return run_dir, meta


def same_architecture(meta: ModelMeta, architecture: str) -> bool:
    """Registry models by name; file models by their function (that the file is the very one the run recorded,
    by SHA-256, is checked where it is run: api.model_for); Python objects by class name."""
    code = meta.code
    if code is not None:
        parsed = parse_file_spec(architecture)
        return parsed is not None and parsed[1] == code.get("function")
    return meta.architecture == architecture


def init_from_run(model: ImageClassifier, run: str, run_dir: Path, meta: ModelMeta,
                  classes: list[str]) -> dict[str, Any]:
    """Load the earlier run's weights into `model` (built with the new class count); returns the record.

    When the classes differ (in number, names or order) the head keeps the fresh initialisation `model`
    was built with; every other tensor must be present in the run with the same shape.
    """
    weights = run_dir / "model.safetensors"
    state = read_weights(weights)
    new_head = list(meta.classes) != list(classes)
    skipped = set(head_state_keys(model)) if new_head else set()
    state = {key: value for key, value in state.items() if key not in skipped}
    check_keys(model.state_dict(), state, f"--init {run}", ignore=skipped, hint="fine-tuning needs the same "
               "architecture and model_kwargs as that run (only the head may differ)")
    model.load_state_dict({**model.state_dict(), **state}, strict=True)
    return {
        "kind": "init",
        "run": str(run),
        "path": str(run_dir.resolve()),
        "architecture": meta.architecture,
        "dataset": meta.dataset,
        "classes": list(meta.classes),
        "head": "new (the classes differ)" if new_head else "loaded",
        "new_keys": sorted(skipped),
        "sha256": file_sha256(weights),
    }


# ---------------------------------------------------------------------------------------------------------
# --weights FILE.safetensors


def load_weights_file(model: ImageClassifier, path: str | Path) -> dict[str, Any]:
    """Load a safetensors state dict that matches the architecture exactly; returns the record.

    Accepted: a cnnkit model's state dict (body.* keys, and rescale.* when it carries its input
    standardisation, which then replaces the model's), or the bare network's (keys without `body.`).
    """
    path = Path(path).expanduser()
    state = read_weights(path)
    if not any(key.startswith(("body.", "rescale.")) for key in state):
        state = {f"body.{key}": value for key, value in state.items()}
    rescale = {key: value for key, value in state.items() if key.startswith("rescale.")}
    if rescale:
        adopt_standardisation(model, rescale, f"--weights {path}")
    expected = model.state_dict()
    check_keys(expected, state, f"--weights {path}", ignore={k for k in expected if k.startswith("rescale.")},
               hint="the file must match the architecture exactly (same --model and --model-kwargs)")
    model.load_state_dict({**expected, **state}, strict=True)
    return {"kind": "weights", "path": str(path.resolve()), "sha256": file_sha256(path)}


def adopt_standardisation(model: ImageClassifier, rescale: dict[str, torch.Tensor], label: str) -> None:
    """Give `model` the input standardisation stored as rescale.scale/offset (x * scale + offset)."""
    scale, offset = rescale.get("rescale.scale"), rescale.get("rescale.offset")
    channels = len(model.rescale.mean)
    if scale is None or offset is None or scale.numel() not in (1, channels) or scale.shape != offset.shape:
        raise CnnkitError(f"{label}: rescale.scale and rescale.offset must both be there, for 1 or {channels} "
                          "channels")
    scale, offset = scale.flatten().double(), offset.flatten().double()
    std = [float(f"{v:.7g}") for v in (1.0 / scale).tolist()]
    mean = [float(f"{v:.7g}") for v in (-offset / scale).tolist()]
    if len(std) == 1 < channels:
        mean, std = mean * channels, std * channels
    device = model.rescale.scale.device
    model.rescale = Rescaling(mean, std).to(device)


def check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], label: str, *,
               ignore: set[str], hint: str) -> None:
    """One-line CnnkitError naming the first missing, unexpected and mis-shaped keys, if any."""
    missing = [key for key in expected if key not in given and key not in ignore]
    unexpected = [key for key in given if key not in expected]
    shapes = [f"{key} {tuple(given[key].shape)} vs {tuple(expected[key].shape)}" for key in expected
              if key in given and key not in ignore and given[key].shape != expected[key].shape]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''}"
                for what, keys in (("missing", missing), ("unexpected", unexpected),
                                   ("shape differs, file vs model", shapes)) if keys]
    if problems:
        raise CnnkitError(f"{label}: the weights do not fit this model: {'; '.join(problems)}; {hint}")

"""cnnkit: train, evaluate and use convolutional image classifiers.

The public verbs mirror Keras: `load_dataset`, `build_model`, `fit`, `evaluate`, `predict`,
`load_run`, plus `train` (the whole `cnnkit train` pipeline), `resume` (an interrupted one) and `compare`
(runs side by side).
They are imported lazily so that `import cnnkit` and `cnnkit --help` stay fast (no torch until a verb
is used).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_dataset": "cnnkit.data.tensors",
    "Dataset": "cnnkit.data.tensors",
    "Split": "cnnkit.data.tensors",
    "build_model": "cnnkit.models",
    "list_models": "cnnkit.models",
    "fit": "cnnkit.engine.fit",
    "shutdown_distributed": "cnnkit.engine.distributed",
    "History": "cnnkit.engine.callbacks",
    "Callback": "cnnkit.engine.callbacks",
    "EarlyStopping": "cnnkit.engine.callbacks",
    "EMA": "cnnkit.engine.callbacks",
    "TensorBoardLogger": "cnnkit.engine.callbacks",
    "evaluate": "cnnkit.engine.evaluate",
    "predict": "cnnkit.prediction",
    "explain": "cnnkit.heatmaps",
    "predict_files": "cnnkit.prediction",
    "predict_images": "cnnkit.prediction",
    "load_run": "cnnkit.runs",
    "train": "cnnkit.api",
    "resume": "cnnkit.api",
    "Checkpoint": "cnnkit.engine.callbacks.checkpoint",
    "save_run": "cnnkit.api",
    "export_run": "cnnkit.export",
    "summary": "cnnkit.models.summary",
    "evaluate_run": "cnnkit.api",
    "compare": "cnnkit.comparison",
    "TrainConfig": "cnnkit.config",
    "resolve_config": "cnnkit.config",
    "list_presets": "cnnkit.config",
    "CnnkitError": "cnnkit.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cnnkit' has no attribute {name!r}")

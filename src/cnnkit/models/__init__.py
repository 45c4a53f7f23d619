"""Model architectures by name; `build_model` returns a ready-to-train ImageClassifier."""

from cnnkit.models.builder import build_model, model_entry
from cnnkit.models.classifier import ImageClassifier, Rescaling
from cnnkit.models.registry import list_models, model_names, register_model

__all__ = ["ImageClassifier", "Rescaling", "build_model", "list_models", "model_entry", "model_names", "register_model"]

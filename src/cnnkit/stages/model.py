"""Stage 3, build the model: a registered architecture, a user's file or object, seeded, with its starting
weights (an earlier run, a weights file, or ImageNet's)."""

from __future__ import annotations

from typing import Any


from cnnkit.config import TrainConfig
from cnnkit.data.tensors import Dataset
from cnnkit.models import build_model, model_entry
from cnnkit.models.classifier import ImageClassifier, custom_architecture
from cnnkit.models.user import (UserCode, build_body, check_classifier, load_function,
                                parse_file_spec, read_code, user_body, verified_code)
from cnnkit.models.transfer import init_from_run, init_meta, load_weights_file
from cnnkit.models.pretrained import find_pretrained, frozen_stages, load_pretrained, stage_lr_factors
from cnnkit.data.download import data_root


def model_for(config: TrainConfig, data: Dataset, user_model: Any = None, code: UserCode | None = None,
              trust_code: bool = False) -> ImageClassifier:
    """Build the configured model, seeded, standardising with train statistics where the model wants it,
    then load its starting weights when `init` (an earlier run) or `weights` (a safetensors file) says so.

    `user_model` is a user's own network given as a Python object (TrainConfig.model then names it
    custom:<class>); a FILE.py:FUNCTION model is built by running that file's function (`code`, when
    already read and checked; an `init` run of such a model needs `trust_code` and the same file).
    """

    init = init_meta(config.init, config.model, config.model_kwargs) if config.init else None
    if init is not None and init[1].code is not None and user_model is None:
        code = verified_code(config.model, init[1].code, trust_code, f"--init {config.init}")
    own = user_model is not None or parse_file_spec(config.model) is not None
    mean = std = None
    if init is not None:  # its features were learned on inputs standardised the earlier run's way
        mean, std = list(init[1].preprocessing.mean), list(init[1].preprocessing.std)
    elif config.pretrained is not None:  # the ImageNet weights' own normalisation, not this data's

        found = find_pretrained(config.model, config.pretrained)
        mean, std = found.normalisation(data.input_shape[0])
    elif own or model_entry(config.model).standardize:
        mean, std = data.channel_stats()
    if own:
        model = user_classifier(config, data, user_model, mean, std, code)
    else:
        model = build_model(config.model, data.input_shape, data.num_classes, mean=mean, std=std,
                            seed=config.seed, **config.model_kwargs)
    if init is not None:
        model.weights_from = init_from_run(model, config.init, *init, data.classes)
    elif config.pretrained is not None:
        cache = data_root(config.data_dir) / "weights"  # converted weights live with the data cache
        model.weights_from = {"kind": "pretrained", **load_pretrained(model.body, found, cache).to_dict()}
    elif config.weights is not None:
        model.weights_from = load_weights_file(model, config.weights)
    frozen_stages(model, config.freeze_stages)  # refused now, not after a probe's backbone pass
    if config.stage_lr_decay != 1.0:
        stage_lr_factors(model, config.stage_lr_decay)  # a model without stages: refused now too
    return model


def user_classifier(config: TrainConfig, data: Dataset, user_model: Any, mean, std,
                    code: UserCode | None = None) -> ImageClassifier:
    """A user's network (an object, or FILE.py:FUNCTION's result) inside the ImageClassifier every model
    ships in, so its input standardisation travels with it to prediction, export and serving."""
    if user_model is not None:
        code = None
        body = user_body(user_model, data.input_shape, data.num_classes, config.seed)
    else:
        code = code or read_code(config.model)
        label = f"model {config.model}: {code.function}"
        body = build_body(load_function(code, f"model {config.model}"), data.input_shape, data.num_classes,
                          config.model_kwargs, config.seed, label, code.path)
    if not isinstance(body, ImageClassifier):
        body = ImageClassifier(body, mean, std)
        body.architecture, body.model_kwargs, body.code = config.model, dict(config.model_kwargs), code
        body.input_shape = data.input_shape
    check_classifier(body, data.input_shape, data.num_classes, f"model {config.model}",
                     code.path if code else None)
    return body


def user_model_name(model: Any) -> tuple[str, dict[str, Any]]:
    """(architecture, model_kwargs) that a run records for a model given as a Python object."""
    if isinstance(model, ImageClassifier) and model.architecture:
        return model.architecture, dict(model.model_kwargs)
    return custom_architecture(model), {}


def run_code(config: TrainConfig, user_model: Any, saved: dict[str, Any] | None, trust_code: bool) -> UserCode | None:
    """The FILE.py:FUNCTION model's code, read once: as it is for a new run, checked against the checkpoint's
    record (and the opt-in) for a resumed one; None for other models."""
    if user_model is not None or parse_file_spec(config.model) is None:
        return None
    if saved is None:
        return read_code(config.model)
    return verified_code(config.model, saved["meta"].get("code"), trust_code, "--resume")

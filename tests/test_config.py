import pytest

from cnnkit.config import PRESETS, TrainConfig, resolve_config
from cnnkit.errors import CnnkitError


def test_defaults_are_the_tutorial_recipe():
    config = resolve_config()
    assert (config.model, config.optimizer, config.lr, config.batch_size, config.epochs) == ("seed", "adam", 1e-3, 32, 10)
    assert config.label_smoothing == 0 and config.augment == "none" and config.schedule == "constant"


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_resolves_to_its_values(name):
    config = resolve_config(name)
    for key, value in PRESETS[name].values.items():
        assert getattr(config, key) == value
    assert config.preset == name


def test_flags_override_the_preset_and_none_means_unset():
    config = resolve_config("fast", epochs=7, lr=None, model=None)
    assert config.epochs == 7
    assert config.lr == PRESETS["fast"].values["lr"]
    assert config.model == "fast"


def test_fast_preset_is_not_the_seed_recipe():
    assert resolve_config("fast").model != TrainConfig().model


@pytest.mark.parametrize("bad,message", [
    ({"epochs": 0}, "--epochs"), ({"optimizer": "lbfgs"}, "--optimizer"), ({"lr": -1.0}, "--lr"),
    ({"label_smoothing": 1.5}, "--label-smoothing"), ({"device": "tpu"}, "--device"),
])
def test_impossible_values_are_rejected_naming_the_flag(bad, message):
    with pytest.raises(CnnkitError, match=message):
        resolve_config(**bad)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(CnnkitError, match="unknown preset 'turbo'.*fast"):
        resolve_config("turbo")

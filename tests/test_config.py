"""The one option schema: defaults, presets as files, config files, validation naming the option as spelled."""

import dataclasses
import json
import re

import pytest

from cnnkit.cli import build_parser
from cnnkit.config import (FIT_FIELDS, TrainConfig, cli_flag, default_of, fit_config, get_preset, list_presets,
                           option_of, preset_chain, resolve_config, schema)
from cnnkit.engine.fit import fit
from cnnkit.errors import CnnkitError
from processes import run_cnnkit


def test_defaults_are_the_tutorial_recipe():
    config = resolve_config()
    assert (config.model, config.optimizer, config.lr, config.batch_size, config.epochs) == ("seed", "adam", 1e-3, 32, 10)
    assert config.label_smoothing == 0 and config.augment == "none" and config.schedule == "constant"


@pytest.mark.parametrize("preset", [p.name for p in list_presets()])
def test_every_preset_file_resolves_to_its_values_and_states_its_measurement(preset):
    config = resolve_config(preset)
    expected = {}
    for link in preset_chain(preset):  # a preset's own values override the ones it extends
        expected.update(link.values)
    for key, value in expected.items():
        assert getattr(config, key) == value
    assert config.preset == preset
    found = get_preset(preset)
    assert found.description and found.path.suffix == ".toml"
    assert re.search(r"\d+\.\d+%", found.measured["result"]) and "benchmarks/" in found.measured["command"]


def test_a_preset_extends_another_and_its_own_values_win(tmp_path):
    chain = preset_chain("fast")
    assert [p.name for p in chain] == ["seed", "fast"]
    user = tmp_path / "mine.toml"
    user.write_text('extends = "fast"\nepochs = 4\nema = 0.99\n')
    config = resolve_config(config_file=user)
    assert (config.model, config.epochs, config.ema, config.preset) == ("fast", 4, 0.99, "fast")


def test_precedence_flags_over_config_file_over_preset(tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text('lr = 0.01\nbatch_size = 64\n')
    config = resolve_config("fast", config_file=user, batch_size=256)
    assert config.batch_size == 256  # flag beats file
    assert config.lr == 0.01  # file beats preset (fast sets 3e-2)
    assert config.schedule == "onecycle"  # preset beats default


def test_flags_override_the_preset_and_none_means_unset():
    config = resolve_config("fast", epochs=7, lr=None, model=None)
    assert config.epochs == 7
    assert config.lr == get_preset("fast").values["lr"]
    assert config.model == "fast"


def test_a_runs_config_json_round_trips_to_the_same_config(tmp_path):
    original = resolve_config("fast", epochs=3, ema=0.995, patience=2, dataset="imagefolder:photos",
                              image_size=[24, 24], seed=5)  # --image-size applies to image folders only
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(original.to_dict(), indent=2))  # as runs.write_json writes it
    assert resolve_config(config_file=saved) == original
    args = build_parser().parse_args(["train", "--config", str(saved)])
    assert resolve_config(config_file=args.config) == original


def test_a_json_config_giving_an_option_twice_is_refused_naming_it(tmp_path):
    """TOML refuses a key given twice; JSON's parsers keep the last, which would hide an edit (an `epochs` added
    above the one already there does nothing). cnnkit's one JSON reader refuses it, for run files too."""
    twice = tmp_path / "twice.json"
    twice.write_text('{"epochs": 1, "model": "fast", "epochs": 2}')
    with pytest.raises(CnnkitError, match=f'^{re.escape(str(twice))}: not valid JSON \\(the key "epochs" is given '
                                          'twice in one object\\)$'):
        resolve_config(config_file=twice)


@pytest.mark.parametrize("bad,message", [
    ({"epochs": 0}, "epochs must be at least 1"), ({"optimizer": "lbfgs"}, "optimizer must be one of"),
    ({"lr": -1.0}, "lr must be above 0"), ({"label_smoothing": 1.5}, "label_smoothing must be below 1"),
    ({"device": "tpu"}, "device must be auto"), ({"lr": float("inf")}, "finite"), ({"val": "1.5"}, "val must be"),
    ({"weight_decay": float("nan")}, "finite"), ({"warmup": -5.0}, "warmup must be at least 0"),
    ({"seed": 10**20}, "seed must be at most"), ({"name": "x" * 245}, "at most 200"),
    ({"ema": 1.0}, "ema must be below 1"), ({"patience": 0}, "patience must be at least 1"),
    ({"epochs": 2.5}, "epochs must be a whole number"), ({"dataset": "mnsit"}, "did you mean 'mnist'"),
    ({"keep": "best", "val": "test"}, "test accuracy"), ({"ema": 0.9, "val": "test"}, "ema"),
    ({"val": True}, "val must be a string or a whole number"), ({"channels_last": 1}, "must be true or false"),
    ({"image_size": [24.5, 24]}, "list of whole numbers"), ({"image_size": [4, 4]}, "from 8 to 4096"),
    ({"threads": 100000}, "this machine has"), ({"model_kwargs": {1: 2}}, "keys must be strings"),
])
def test_impossible_values_are_rejected_naming_the_option_as_python_spells_it(bad, message):
    with pytest.raises(CnnkitError, match=message):
        resolve_config(**bad)


def test_errors_name_the_flag_on_the_cli_and_the_key_in_a_file(tmp_path):
    with pytest.raises(CnnkitError, match="^--batch-size must be at least 1"):
        resolve_config(spell=cli_flag, batch_size=0)
    user = tmp_path / "mine.toml"
    user.write_text("batch_size = 0\n")
    with pytest.raises(CnnkitError, match=f"^{re.escape(str(user))}: batch_size must be at least 1"):
        resolve_config(config_file=user)
    user.write_text("batch_sise = 64\n")
    with pytest.raises(CnnkitError, match="batch_sise is not a training option.*did you mean 'batch_size'"):
        resolve_config(config_file=user)
    user.write_text("epochs = [\n")
    with pytest.raises(CnnkitError, match="not valid TOML"):
        resolve_config(config_file=user)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(CnnkitError, match="unknown preset 'turbo'.*fast"):
        resolve_config("turbo")


def test_fit_accepts_exactly_the_fit_options_of_the_schema():
    assert fit_config(lr=0.5, ema=0.9).lr == 0.5
    with pytest.raises(CnnkitError, match="dataset is not an option of fit"):
        fit_config(dataset="mnist")
    with pytest.raises(CnnkitError, match="lrr is not an option of fit.*did you mean 'lr'"):
        fit(None, None, lrr=0.1)
    with pytest.raises(CnnkitError, match="^batch_size must be at least 1"):
        fit(None, None, batch_size=0)


def test_the_cli_exposes_every_schema_field_with_the_schemas_default_in_its_help():
    train = next(action for action in build_parser()._subparsers._group_actions[0].choices.values()
                 if action.prog.endswith("train"))
    flags = {option: action for action in train._actions for option in action.option_strings}
    for field in schema():
        flag = cli_flag(field.name)
        assert flag in flags, flag
        default = default_of(field)
        if default is not None and default != {}:
            shown = ("on" if default else "off") if isinstance(default, bool) else default
            assert f"(default: {shown})" in flags[flag].help, (flag, flags[flag].help)
    flat_help = " ".join(train.format_help().split())
    assert set(FIT_FIELDS) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert "one of adam, adamw, sgd" in flat_help and "cosine" in flat_help


def test_cli_flags_parse_to_schema_values_and_only_typed_flags_are_set():
    args = build_parser().parse_args(["train", "--batch-size", "64", "--no-channels-last", "--image-size", "24x20",
                                      "--model-kwargs", '{"crop": 2}', "--ema", "0.99"])
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in schema()}}
    assert given == {"batch_size": 64, "channels_last": False, "image_size": [24, 20], "model_kwargs": {"crop": 2},
                     "ema": 0.99}
    assert option_of("ema").scope == "fit"


def test_the_cli_rejects_abbreviated_flags_and_bad_values_in_one_line():
    for argv, expected in ((["--epoch", "1"], "unrecognized arguments: --epoch 1 (did you mean --epochs?)"),
                           (["--optimizer", "adm"], "(did you mean adam?)"),
                           (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
                           (["--optimizer", "adm"], "invalid choice: 'adm'")):
        result = run_cnnkit("train", *argv)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode != 0 and len(lines) == 1 and expected in lines[0], result.stderr
    lines = run_cnnkit("train", "--epochs", "abc").stderr.splitlines()  # argparse's own refusal, once with usage
    assert lines == ["cnnkit train: error: argument --epochs: invalid int value: 'abc' (`cnnkit train --help` lists "
                     "its options)"]


def test_presets_command_lists_each_preset_with_what_it_sets_and_its_measurement():
    out = run_cnnkit("presets", check=True).stdout
    assert "fast:" in out and "model = fast" in out and "extends seed" in out and "seed:" in out
    assert "measured: 99.22%" in out

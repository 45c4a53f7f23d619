"""The Python API: the Keras verbs from `import cnnkit`, on a real MNIST slice."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import cnnkit
from cnnkit.config import TrainConfig
from cnnkit.errors import CnnkitError
from processes import run_cnnkit
from slices import SHARED_DATA


def test_keras_style_workflow_and_saved_run(tmp_path):
    result = cnnkit.train(dataset="mnist", data_dir=str(SHARED_DATA), epochs=1, limit_train=3000, limit_eval=500,
                          runs_dir=str(tmp_path), progress=False, log=lambda *_: None)
    assert result.run_dir == tmp_path / "train"
    assert set(result.history.history) >= {"loss", "accuracy", "val_loss", "val_accuracy", "lr", "seconds"}

    data = cnnkit.load_dataset("mnist", str(SHARED_DATA), limit_train=3000, limit_eval=500, progress=False)
    run = cnnkit.load_run(result.run_dir)
    report = cnnkit.evaluate(run.model, data.test, data.classes)
    assert report.accuracy == result.metrics["test_accuracy"]  # the same model, the same test slice

    probabilities = cnnkit.predict(run.model, data.test.images[:20])  # callable even after api was imported
    assert probabilities.shape == (20, 10)
    assert torch.allclose(probabilities.sum(1), torch.ones(20), atol=1e-5)
    assert np.array_equal(probabilities.argmax(1).numpy(), report.predictions[:20].numpy())


def test_package_import_is_light():
    import subprocess
    import sys

    code = "import sys, cnnkit, cnnkit.cli; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_build_model_is_seeded_without_touching_the_global_generator():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = cnnkit.build_model("seed")
    after = torch.rand(1)
    again = cnnkit.build_model("seed")
    other = cnnkit.build_model("seed", seed=1)
    same = [torch.equal(a, b) for a, b in zip(first.state_dict().values(), again.state_dict().values())]
    assert all(same) and torch.equal(before, after)  # identical scripts build identical models
    assert not torch.equal(first.body[0].weight, other.body[0].weight)


def test_summary_prints_the_keras_table_for_an_api_model():
    model = cnnkit.build_model("seed", (1, 28, 28), 10)
    text = str(cnnkit.summary(model))
    assert "225,034" in text and "(None, 64, 11, 11)" in text and "body.7 (Linear)" in text
    assert str(model.summary()) == text and repr(model.summary()) == text
    assert "(None, 64, 13, 13)" in str(cnnkit.summary(model.body[:5], (1, 32, 32)))  # any module, given a shape


def test_an_api_trained_model_becomes_a_run_every_cli_verb_accepts(tmp_path):
    import json

    data = cnnkit.load_dataset("mnist", str(SHARED_DATA), limit_train=2000, limit_eval=300, progress=False)
    model = cnnkit.build_model("seed", data.input_shape, data.num_classes)
    history = cnnkit.fit(model, data, epochs=1, progress=False)
    path = cnnkit.save_run(model, data, history, tmp_path / "api-run")
    metrics = json.loads((path / "metrics.json").read_text())
    assert metrics["test_accuracy"] == cnnkit.evaluate(model, data.test, data.classes).accuracy
    config = json.loads((path / "config.json").read_text())
    assert config["model"] == "seed" and config["dataset"] == "mnist" and config["epochs"] == 1
    run = cnnkit.load_run(path)
    assert torch.equal(run.model.body[0].weight, model.body[0].weight.cpu())
    evaluated = run_cnnkit("evaluate", str(path), "--data-dir", str(SHARED_DATA),
                           "--limit", "300", "--json", check=True)
    assert json.loads(evaluated.stdout)["accuracy"] == metrics["test_accuracy"]


def test_reprs_are_short_and_say_what_matters():
    data = cnnkit.load_dataset("mnist", str(SHARED_DATA), limit_train=500, limit_eval=200, progress=False)
    assert repr(data) == ("Dataset('mnist': 500 train / 200 val (held-out) / 200 test images, 10 classes, "
                          "input (1, 28, 28))")
    assert repr(data.test) == "Split(200 images (1, 28, 28) uint8 on cpu)"
    model = cnnkit.build_model("seed", data.input_shape, data.num_classes)
    history = cnnkit.fit(model, data, epochs=2, progress=False)
    assert repr(history).startswith("History(2 epochs, best val_accuracy 0.") and "kept epoch" in repr(history)
    report = cnnkit.evaluate(model, data.test, data.classes)
    text = repr(report)
    assert text.startswith(f"EvalReport(accuracy={report.accuracy:.4f} (95% CI ") and len(text) < 200
    low, high = report.accuracy_ci95
    assert low < report.accuracy < high and high - low > 0.05  # 200 images: a wide interval


def test_keywords_given_with_a_config_refine_it_instead_of_being_dropped(tmp_path):
    config = cnnkit.resolve_config(preset="seed", dataset="mnist", data_dir=str(SHARED_DATA), limit_train=256,
                                   limit_eval=64, runs_dir=str(tmp_path))
    result = cnnkit.train(config, model="fast", epochs=2, name="refined", progress=False, log=lambda *_: None)
    assert result.run_dir == tmp_path / "refined" and result.metrics["epochs"] == 2
    assert result.metrics["model"] == "fast" and result.metrics["preset"] == "seed"
    assert result.metrics["num_train"] == 256 and result.metrics["num_test"] == 64  # the config's own options stay


def test_a_config_made_with_a_preset_holds_its_values_under_the_options_given(tmp_path):
    """TrainConfig(preset="fast", ...) once held the defaults where no value was given, trained the tutorial's
    recipe and recorded the preset; it is the preset under the options given, as --preset under flags, also
    where a given value is the preset's own (epochs=1). A complete config (resolve_config's) is kept whole:
    an option set back to its default stays there. preset= beside a config is refused: it would have to guess."""
    fast = cnnkit.resolve_config(preset="fast")
    data = dict(dataset="mnist", data_dir=str(SHARED_DATA), limit_train=512, limit_eval=128, runs_dir=str(tmp_path))
    config = TrainConfig(preset="fast", epochs=fast.epochs, lr=0.01, **data)
    assert config == dataclasses.replace(fast, lr=0.01, **data)
    result = cnnkit.train(config, name="by-hand", progress=False, log=lambda *_: None)
    recorded = json.loads((result.run_dir / "config.json").read_text())
    assert (recorded["preset"], recorded["model"], recorded["lr"], recorded["limit_train"]) == ("fast", "fast", 0.01,
                                                                                                512)
    assert recorded["batch_size"] == fast.batch_size != TrainConfig().batch_size
    default_lr = TrainConfig().lr
    resolved = cnnkit.resolve_config(preset="fast", lr=default_lr)
    assert fast.lr != default_lr and dataclasses.replace(resolved).lr == default_lr
    with pytest.raises(CnnkitError, match=r"^preset='fast' beside a TrainConfig would have to guess"):
        cnnkit.train(TrainConfig(**data), preset="fast", progress=False, log=lambda *_: None)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["by-hand"]


def test_devices_in_python_outside_torchrun_is_refused_before_anything_is_written(tmp_path):
    """cnnkit.train(devices=2) once trained in one process and recorded devices 2 (repeating its config.json
    from the command line starts two)."""
    with pytest.raises(CnnkitError, match=r"cnnkit train --devices 2`, or start this script with `torchrun"):
        cnnkit.train(dataset="mnist", data_dir=str(SHARED_DATA), limit_train=256, limit_eval=64, devices=2,
                     runs_dir=str(tmp_path / "runs"), progress=False, log=lambda *_: None)
    assert not (tmp_path / "runs").exists()

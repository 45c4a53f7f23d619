"""Run directories: atomic, complete, and loadable with no code executed from the files."""

import json

import pytest
import torch

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_write, write_text
from cnnkit.models import build_model
from cnnkit.runs import load_run, next_run_name, save_model, staged_run, write_json

META = {"architecture": "seed", "model_kwargs": {}, "classes": [str(i) for i in range(10)], "dataset": "mnist",
        "input": {"channels": 1, "height": 28, "width": 28},
        "preprocessing": {"mean": [0.0], "std": [255.0], "background": "dark"}}


def test_atomic_write_leaves_the_old_file_and_no_temp_file_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as handle:
            handle.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_run_names_increment(tmp_path):
    assert next_run_name(tmp_path) == "train"
    (tmp_path / "train").mkdir()
    assert next_run_name(tmp_path) == "train2"
    (tmp_path / "train7").mkdir()
    assert next_run_name(tmp_path) == "train8"


def test_failed_run_leaves_nothing_behind(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with staged_run(tmp_path, None) as (staging, _):
            write_text(staging / "config.json", "{}")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def _saved_run(tmp_path):
    torch.manual_seed(0)
    model = build_model("seed")
    with staged_run(tmp_path, "demo") as (staging, final):
        save_model(staging, model, META)
    return model, final[0]


def test_saved_run_reloads_to_the_same_function(tmp_path):
    model, run_dir = _saved_run(tmp_path)
    assert run_dir == tmp_path / "demo"
    run = load_run(run_dir)
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model.eval()(images), run.model(images))
    assert run.classes == META["classes"] and run.input_shape == (1, 28, 28)


def test_explicit_name_that_exists_is_refused(tmp_path):
    _saved_run(tmp_path)
    with pytest.raises(CnnkitError, match="already exists"):
        with staged_run(tmp_path, "demo"):
            pass


def test_truncated_weights_are_a_one_line_user_error(tmp_path):
    _, run_dir = _saved_run(tmp_path)
    weights = run_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CnnkitError, match="model.safetensors: cannot load weights") as info:
        load_run(run_dir)
    assert "\n" not in str(info.value)


def test_model_json_that_is_not_ours_is_refused(tmp_path):
    _, run_dir = _saved_run(tmp_path)
    write_json(run_dir / "model.json", {"format": "something-else"})
    with pytest.raises(CnnkitError, match="model.json: not a cnnkit model"):
        load_run(run_dir)
    (run_dir / "model.json").write_text("{not json")
    with pytest.raises(CnnkitError, match="model.json: not valid JSON"):
        load_run(run_dir)


def test_weights_for_another_architecture_are_refused(tmp_path):
    _, run_dir = _saved_run(tmp_path)
    meta = json.loads((run_dir / "model.json").read_text())
    meta["architecture"] = "fast"
    write_json(run_dir / "model.json", meta)
    with pytest.raises(CnnkitError, match="model.json says architecture fast, the weights were saved with seed"):
        load_run(run_dir)

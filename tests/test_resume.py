"""Checkpoints and exact resume: a run stopped after epoch k and resumed ends as if it had never stopped.

In-process: fit() interrupted by an exception after epoch 2, then fit(resume=...) from the checkpoint,
against one uninterrupted fit() with the same seed: the same weights bit for bit, the same history.
End to end: a real `cnnkit train` process killed with SIGKILL after its second checkpoint (and another
stopped with SIGTERM), then `cnnkit train --resume`, against an uninterrupted process.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnkit.engine.callbacks.checkpoint import Checkpoint
from cnnkit.engine.checkpoint import CHECKPOINT_JSON, join_tensors, read_checkpoint, split_tensors, write_checkpoint
from cnnkit.engine.fit import fit
from cnnkit.errors import CnnkitError
from cnnkit.models import build_model
from checkpoints import StopAfter, wait_for_checkpoint
from processes import run_cnnkit as cnnkit, start_cnnkit
from slices import SHARED_DATA, mnist_dataset

# Every callback with state is on: EMA (its average), weight selection (the best snapshot), early
# stopping (its counter), and AdamW with a one-cycle schedule (moments, step count, the rate by step).
OPTIONS = dict(epochs=4, batch_size=64, lr=3e-3, optimizer="adamw", weight_decay=1e-2, schedule="onecycle",
               warmup=0.2, augment="shift=2", ema=0.9, keep="best", patience=10, label_smoothing=0.1,
               precision="fp32", seed=3)
# Muon (momentum buffers of kernels, SGD groups at their own rates) on micro-batches.
MUON_OPTIONS = {**OPTIONS, "optimizer": "muon", "lr": 0.05, "head_lr_scale": 20.0, "bias_lr_scale": 20.0,
                "weight_decay": 1e-4, "micro_batch": 16}


def small_data():
    return mnist_dataset(limit_train=1000, limit_eval=300)


def fresh_model():
    return build_model("fast", (1, 28, 28), 10, seed=3)


def without_seconds(history: dict) -> dict:
    return {key: values for key, values in history.items() if key != "seconds"}


def test_nested_state_round_trips_through_json_and_tensors():
    state = {"epoch": 2, "a": [torch.arange(3), (1.5, None, "x")], "b": {"c": torch.ones(2, 2), "nan": math.nan},
             "inf": -math.inf}
    tensors: dict = {}
    document = split_tensors(state, tensors)
    json.dumps(document, allow_nan=False)  # plain JSON: no NaN literal, no tensor
    back = join_tensors(json.loads(json.dumps(document)), tensors)
    assert torch.equal(back["a"][0], state["a"][0]) and back["a"][1] == [1.5, None, "x"]
    assert torch.equal(back["b"]["c"], state["b"]["c"]) and math.isnan(back["b"]["nan"]) and back["inf"] == -math.inf


def test_a_checkpoint_replaces_the_previous_one_whole(tmp_path):
    write_checkpoint(tmp_path, {"epoch": 1, "step": 10, "w": torch.zeros(3)})
    write_checkpoint(tmp_path, {"epoch": 2, "step": 20, "w": torch.ones(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_JSON, "checkpoint-0002.safetensors"])
    state = read_checkpoint(tmp_path)
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.ones(3))


def test_a_damaged_checkpoint_is_a_clear_error(tmp_path):
    write_checkpoint(tmp_path, {"epoch": 1, "step": 10, "w": torch.zeros(3)})
    (tmp_path / "checkpoint-0001.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CnnkitError, match="cannot load weights"):
        read_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_JSON).write_text("{not json")
    with pytest.raises(CnnkitError, match="not a readable checkpoint"):
        read_checkpoint(tmp_path)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels in both runs, and the benchmark-free half of the machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("options", [OPTIONS, MUON_OPTIONS], ids=["adamw", "muon-micro-batches"])
def test_fit_resumed_after_an_interruption_ends_bit_for_bit_as_an_uninterrupted_fit(tmp_path, one_thread, options):
    data = small_data()
    whole = fresh_model()
    history = fit(whole, data, progress=False, **options)

    stopped = fresh_model()
    with pytest.raises(KeyboardInterrupt):
        fit(stopped, data, progress=False, callbacks=[Checkpoint(tmp_path), StopAfter(2)], **options)
    saved = read_checkpoint(tmp_path)
    assert saved["epoch"] == 2 and saved["step"] == 2 * math.ceil(len(data.train) / options["batch_size"])

    resumed_model = fresh_model()  # a new process would start from a freshly built model
    resumed = fit(resumed_model, data, progress=False, resume=saved, **options)

    assert resumed.epoch == history.epoch == [1, 2, 3, 4]
    assert without_seconds(resumed.history) == without_seconds(history.history)
    assert resumed.steps == history.steps and resumed.selected == history.selected
    expected, got = whole.state_dict(), resumed_model.state_dict()
    assert expected.keys() == got.keys()
    differing = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not differing, differing


# ----------------------------------------------------------------------------------------------------
# Real processes


TRAIN = ["train", "--data-dir", str(SHARED_DATA), "--limit-train", "3000", "--limit-eval", "500", "--model", "fast",
         "--epochs", "4", "--batch-size", "64", "--optimizer", "adamw", "--lr", "3e-3", "--schedule", "onecycle",
         "--ema", "0.9", "--precision", "fp32", "--threads", "1", "--quiet"]


def run_files(run: Path) -> tuple[dict, list[str]]:
    weights = load_file(str(run / "model.safetensors"))
    rows = (run / "history.csv").read_text().splitlines()
    header = rows[0].split(",")
    keep = [i for i, key in enumerate(header) if key != "seconds"]
    return weights, [",".join(row.split(",")[i] for i in keep) for row in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("whole")
    result = cnnkit(*TRAIN, "--runs-dir", str(runs), "--name", "whole", timeout=600)
    assert result.returncode == 0, result.stderr
    return runs / "whole"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_a_killed_training_resumes_to_the_same_weights_and_history(tmp_path, uninterrupted, how):
    runs = tmp_path / "runs"
    process = start_cnnkit(*TRAIN, "--runs-dir", str(runs), "--name", "whole")
    staging = wait_for_checkpoint(runs, 2, process)
    process.send_signal(getattr(signal, how))
    _, stderr = process.communicate(timeout=60)
    if how == "SIGTERM":  # handled as Ctrl-C: ended by SIGINT after a one-line message naming the way back
        assert process.returncode == -signal.SIGINT, stderr
        assert "Traceback" not in stderr and f"cnnkit train --resume {staging}" in stderr, stderr
    else:
        assert process.returncode == -signal.SIGKILL
    assert not (runs / "whole").exists() and staging.is_dir()
    assert not list(staging.glob(".*.tmp")), "a half-written file was left"  # kills between writes leave none
    read_checkpoint(staging)  # whole and readable
    listed = cnnkit("runs", str(runs), env={**os.environ, "COLUMNS": "400"})  # no wrapping of the long line
    assert f"stopped after epoch 2 of 4; continue with: cnnkit train --resume {staging}" in listed.stdout

    result = cnnkit("train", "--resume", str(staging), "--quiet", timeout=600)
    assert result.returncode == 0, result.stderr
    final = runs / "whole"
    assert not staging.exists() and final.is_dir()
    assert not list(final.glob("checkpoint*")), "a finished run keeps no checkpoint"
    weights, history = run_files(final)
    expected_weights, expected_history = run_files(uninterrupted)
    assert history == expected_history
    assert weights.keys() == expected_weights.keys()
    assert all(torch.equal(weights[key], expected_weights[key]) for key in weights)
    test = json.loads((final / "metrics.json").read_text())["test_accuracy"]
    assert test == json.loads((uninterrupted / "metrics.json").read_text())["test_accuracy"]


def test_resume_refuses_a_finished_run_changed_options_and_changed_data(tmp_path, uninterrupted):
    finished = cnnkit("train", "--resume", str(uninterrupted))
    assert finished.returncode == 1 and "is a finished run" in finished.stderr and "Traceback" not in finished.stderr

    changed = cnnkit("train", "--resume", str(uninterrupted), "--epochs", "9")
    assert changed.returncode == 1 and "drop --epochs" in changed.stderr

    # An unfinished run whose data changed: its checkpoint records another fingerprint.
    staging = tmp_path / ".x.partial-1"
    staging.mkdir()
    config = json.loads((uninterrupted / "config.json").read_text())
    write_checkpoint(staging, {"epoch": 1, "step": 1, "stop_training": False, "model": {}, "torch_rng": torch.get_rng_state(),
                               "optimizer": {"state": {}, "param_groups": []}, "callbacks": {},
                               "meta": {"config": config, "data": "0" * 64}})  # whole, but of other data
    different = cnnkit("train", "--resume", str(staging))
    assert different.returncode == 1, different.stderr
    assert "differs from the data this run started with" in different.stderr and "Traceback" not in different.stderr
    assert staging.is_dir() and (staging / CHECKPOINT_JSON).is_file()  # refusing loses nothing

    missing = cnnkit("train", "--resume", str(tmp_path / "nowhere"))
    assert missing.returncode == 1 and "no such run directory" in missing.stderr


def test_a_run_in_use_cannot_be_resumed_twice(tmp_path):
    runs = tmp_path / "runs"
    # 300 epochs, stopped long before: 30 leave only seconds for the second process to start beside other tests.
    process = start_cnnkit(*TRAIN, "--epochs", "300", "--runs-dir", str(runs))
    try:
        staging = wait_for_checkpoint(runs, 1, process)
        second = cnnkit("train", "--resume", str(staging))
        assert second.returncode == 1 and "in use by another cnnkit process" in second.stderr, second.stderr
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGINT


def test_a_checkpoint_resumes_with_the_options_it_recorded_not_what_its_preset_says_today(tmp_path):
    """A checkpoint records every option, so its preset is not applied again: an option the record lacks (added
    to cnnkit since the run began) takes its default, and a value recorded as none stays none, whatever the
    preset says today."""
    import dataclasses

    from cnnkit.api import config_of
    from cnnkit.config import resolve_config

    record = dataclasses.asdict(resolve_config("transfer-best"))
    del record["probe_epochs"]  # not an option yet when this run began
    record["ema"] = None  # and the preset's 0.999 not what it trained with
    config = config_of({"meta": {"config": record}}, tmp_path)
    assert config.probe_epochs == 0 and config.ema is None, config
    assert config.preset == "transfer-best" and config.model == "efficientnet_lite2" and config.lr == 2.5e-4

"""Callbacks in fit(): the hooks in order, early stopping, best-epoch restore, EMA, and History recording any key.

Crafted validation sequences are injected by a callback that runs before the ones under test, so the real
loop, the real models and real MNIST images are used while the values the callbacks see are known.
"""

import math

import pytest
import torch
from torch import nn

from cnnkit.engine.callbacks import EMA, Callback, EarlyStopping, History
from cnnkit.engine.callbacks.ema import ema_decay
from cnnkit.engine.fit import fit
from cnnkit.engine.optim import SCHEDULES
from cnnkit.errors import CnnkitError
from cnnkit.models import build_model
from slices import mnist_dataset


def small_data():
    return mnist_dataset(limit_train=256, limit_eval=128)


def seed_model(data, seed=0):
    torch.manual_seed(seed)
    return build_model("seed", data.input_shape, data.num_classes)


class Scripted(Callback):
    """Overwrites logs values with a crafted sequence (one per epoch) before other callbacks read them."""

    def __init__(self, order: int = -20, **sequences: list[float]) -> None:
        self.order, self.sequences = order, sequences

    def on_epoch_end(self, epoch, logs):
        for key, values in self.sequences.items():
            logs[key] = values[epoch - 1]


class WeightRecorder(Callback):
    """A copy of the model's weights at the end of every epoch."""

    order = 50

    def __init__(self) -> None:
        self.by_epoch = {}

    def on_epoch_end(self, epoch, logs):
        self.by_epoch[epoch] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_user_callback_sees_every_hook_in_order_and_can_add_a_logged_value():
    data = small_data()

    class Tracer(Callback):
        def __init__(self):
            self.calls = []

        def on_train_begin(self, logs=None):
            self.calls.append(("train_begin",))

        def on_epoch_begin(self, epoch, logs=None):
            self.calls.append(("epoch_begin", epoch))

        def on_batch_end(self, batch, logs=None):
            self.calls.append(("batch_end", batch))

        def on_epoch_end(self, epoch, logs):
            self.calls.append(("epoch_end", epoch, sorted(logs)))
            logs["my_metric"] = epoch * 10.0

        def on_train_end(self, logs=None):
            self.calls.append(("train_end",))

    tracer = Tracer()
    history = fit(seed_model(data), data, epochs=2, batch_size=100, callbacks=[tracer], progress=False)
    steps = math.ceil(len(data.train) / 100)  # 256 images -> 3 steps
    expected = [("train_begin",)]
    for epoch in (1, 2):
        expected += [("epoch_begin", epoch)] + [("batch_end", b) for b in range(steps)]
        expected += [("epoch_end", epoch, sorted(["loss", "accuracy", "val_loss", "val_accuracy", "lr"]))]
    expected += [("train_end",)]
    assert tracer.calls == expected
    assert history.history["my_metric"] == [10.0, 20.0]  # any key reaches History ...
    assert "my_metric" in history.to_csv().splitlines()[0].split(",")  # ... and history.csv
    assert tracer.model is not None and tracer.state.step == 2 * steps


def test_a_callback_can_stop_training():
    data = small_data()

    class StopAfterOne(Callback):
        def on_epoch_end(self, epoch, logs):
            self.state.stop_training = True

    history = fit(seed_model(data), data, epochs=5, batch_size=128, callbacks=[StopAfterOne()], progress=False)
    assert history.epoch == [1]


def test_early_stopping_stops_at_the_right_epoch_on_a_crafted_sequence():
    data = small_data()
    # Improvements at epochs 1, 2, 4; with patience 2 the epochs 5 and 6 without one stop training after 6.
    values = [0.50, 0.60, 0.60, 0.70, 0.65, 0.70, 0.90, 0.95]
    history = fit(seed_model(data), data, epochs=8, batch_size=128, patience=2, callbacks=[Scripted(val_accuracy=values)],
                  progress=False)
    assert history.epoch == [1, 2, 3, 4, 5, 6]
    assert history.history["val_accuracy"] == values[:6]


def test_early_stopping_on_val_loss_counts_down_and_resets():
    stopper = EarlyStopping("val_loss", patience=3)

    class State:
        stop_training = False

    stopper.set_state(State())
    stopper.on_train_begin()
    for epoch, loss in enumerate([1.0, 0.9, 0.95, 0.91, 0.8, 0.85, 0.85, 0.81], start=1):
        stopper.on_epoch_end(epoch, {"val_loss": loss})
        if stopper.state.stop_training:
            break
    assert stopper.stopped_epoch == 8 and stopper.best == 0.8
    with pytest.raises(CnnkitError, match="monitors 'val_los'"):
        EarlyStopping("val_los").on_epoch_end(1, {"val_loss": 1.0})


@pytest.mark.parametrize("keep,expected_epoch", [("best", 2), ("last", 3)])
def test_keep_restores_the_chosen_epochs_weights_bit_for_bit(keep, expected_epoch):
    data = small_data()
    model, recorder = seed_model(data), WeightRecorder()
    history = fit(model, data, epochs=3, batch_size=64, keep=keep, callbacks=[Scripted(val_accuracy=[0.5, 0.9, 0.7]),
                                                                               recorder], progress=False)
    assert history.selected.to_dict() == {"keep": keep, "epoch": expected_epoch, "weights": "raw", "monitor": "val_accuracy",
                                "value": [0.5, 0.9, 0.7][expected_epoch - 1]}
    assert same_weights(model.state_dict(), recorder.by_epoch[expected_epoch])
    other = 3 if expected_epoch == 2 else 2
    assert not same_weights(model.state_dict(), recorder.by_epoch[other])


def test_keep_best_by_val_loss_picks_the_lowest():
    data = small_data()
    model, recorder = seed_model(data), WeightRecorder()
    history = fit(model, data, epochs=3, batch_size=64, monitor="val_loss",
                  callbacks=[Scripted(val_loss=[0.3, 0.4, 0.2]), recorder], progress=False)
    assert history.selected.epoch == 3 and history.selected.monitor == "val_loss"
    assert same_weights(model.state_dict(), recorder.by_epoch[3])


def test_ema_weights_equal_a_hand_computed_average_on_a_tiny_model():
    data = small_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, images):
            return self.net(images.float() / 255)

    tiny = Tiny()

    class StepRecorder(Callback):
        order = -20

        def on_train_begin(self, logs=None):
            self.weights = [{k: v.detach().clone() for k, v in self.model.state_dict().items()}]

        def on_batch_end(self, batch, logs=None):
            self.weights.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})

    recorder, ema = StepRecorder(), EMA(0.9)
    history = fit(tiny, data, epochs=2, batch_size=32, lr=0.05, callbacks=[recorder, ema], keep="last",
                  progress=False)
    expected = {k: v.double() for k, v in recorder.weights[0].items()}
    for n, weights in enumerate(recorder.weights[1:], start=1):
        decay = min(0.9, (1 + n) / (10 + n))
        expected = {k: decay * expected[k] + (1 - decay) * weights[k].double() for k in expected}
    assert len(recorder.weights) == 1 + 2 * 8  # 256 images / 32 per step, 2 epochs
    averaged = ema.average.state_dict()
    for key in expected:
        assert torch.allclose(averaged[key].double(), expected[key], atol=1e-6), key
        assert not torch.allclose(averaged[key], recorder.weights[-1][key])  # an average, not the last weights
    assert ema_decay(0.999, 1) == pytest.approx(2 / 11) and ema_decay(0.9, 10**6) == 0.9
    assert len(history.history["ema_val_accuracy"]) == 2 and "ema_val_loss" in history.history


def test_ema_is_kept_only_when_validation_says_it_is_better():
    data = small_data()
    model = seed_model(data)
    ema = EMA(0.9)
    # Scripted runs after EMA (order -5 > -10): the averaged weights score better in epoch 2.
    scripted = Scripted(order=-5, val_accuracy=[0.6, 0.7], ema_val_accuracy=[0.5, 0.8])
    history = fit(model, data, epochs=2, batch_size=64, callbacks=[ema, scripted], progress=False)
    assert history.selected.weights == "ema" and history.selected.epoch == 2
    assert same_weights(model.state_dict(), ema.average.state_dict())

    model = seed_model(data)
    ema = EMA(0.9)
    scripted = Scripted(order=-5, val_accuracy=[0.6, 0.9], ema_val_accuracy=[0.5, 0.8])
    history = fit(model, data, epochs=2, batch_size=64, callbacks=[ema, scripted], progress=False)
    assert history.selected.weights == "raw"
    assert not same_weights(model.state_dict(), ema.average.state_dict())


def test_weights_are_never_chosen_by_the_test_set():
    data = mnist_dataset(limit_train=256, limit_eval=128)
    tutorial = type(data)(data.name, data.classes, data.train, data.test, data.test, val_source="test")
    with pytest.raises(CnnkitError, match="test accuracy"):
        fit(seed_model(data), tutorial, epochs=1, keep="best", progress=False)
    with pytest.raises(CnnkitError, match="ema"):
        fit(seed_model(data), tutorial, epochs=1, ema=0.99, progress=False)
    history = fit(seed_model(data), tutorial, epochs=1, progress=False)  # keep auto -> last
    assert history.selected.keep == "last"


def test_history_records_any_key_and_fills_gaps_with_nan():
    history = History()
    history.append(1, loss=1.0)
    history.append(2, loss=0.5, ema_val_accuracy=0.9)
    assert history.history["loss"] == [1.0, 0.5]
    assert math.isnan(history.history["ema_val_accuracy"][0]) and history.history["ema_val_accuracy"][1] == 0.9
    again = History.from_csv(history.to_csv())
    assert again.epoch == [1, 2] and again.history["loss"] == [1.0, 0.5]


def test_multi_process_without_a_process_group_is_a_clear_error():
    data = small_data()
    with pytest.raises(CnnkitError, match="process group"):
        fit(seed_model(data), data, epochs=1, rank=0, world_size=2, progress=False)


def test_cosine_schedule_warms_up_then_follows_half_a_cosine():
    rates = [SCHEDULES.get("cosine")(step, 100, 0.1, 0.1) for step in range(100)]
    assert rates[9] == pytest.approx(0.1) and rates[0] == pytest.approx(0.01)
    assert rates[10 + 45] == pytest.approx(0.05, rel=0.05)  # half-way through the decay: half the peak
    assert all(a >= b for a, b in zip(rates[9:], rates[10:])) and rates[-1] < 0.001


def test_the_readme_callback_example_works_as_written():
    import re
    from pathlib import Path

    import cnnkit

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(code for code in re.findall(r"```python\n(.*?)```", readme, re.S) if "class StopAtTarget" in code)
    definition, call = block.rsplit("\n\n", 1)
    assert "callbacks=[StopAtTarget()]" in call
    namespace = {"cnnkit": cnnkit}
    exec(definition, namespace)  # noqa: S102 - the README's own example
    data = mnist_dataset(limit_train=2000, limit_eval=500)
    history = fit(seed_model(data), data, epochs=5, callbacks=[namespace["StopAtTarget"](0.5)], progress=False)
    assert history.epoch == [1] and history.history["gap"][0] <= 0  # past 50% after one epoch, so it stopped


def test_phases_name_the_order_and_a_user_callback_sees_the_epochs_figures_and_is_recorded():
    from cnnkit.engine.callbacks import (FreezeBackbone, Phase, ProgressBar, TerminateOnNaN, TimeBudget,
                                         WeightSelection, show_order)

    class Seen(Callback):
        def __init__(self):
            self.keys = []

        def on_epoch_end(self, epoch, logs):
            self.keys.append(sorted(logs))
            logs["mine"] = float(epoch)

    seen = Seen()
    callbacks = [ProgressBar(), History(), seen, TimeBudget(1000), WeightSelection("val_accuracy", "best"),
                 EarlyStopping("val_accuracy", 5), TerminateOnNaN(), EMA(0.9), FreezeBackbone(1)]
    names = [line.split()[-1] for line in show_order(callbacks).splitlines()]
    assert names == ["FreezeBackbone", "EMA", "TerminateOnNaN", "EarlyStopping", "WeightSelection", "Seen",
                     "TimeBudget", "History", "ProgressBar"]
    assert show_order([seen]).split() == [str(int(Phase.USER)), "user", "Seen"]
    data = small_data()
    history = fit(seed_model(data), data, epochs=2, batch_size=64, ema=0.9, progress=False, callbacks=[seen])
    assert "ema_val_accuracy" in seen.keys[0] and "val_accuracy" in seen.keys[0] and "seconds" not in seen.keys[0]
    assert history.history["mine"] == [1.0, 2.0]  # what it added is recorded: it runs before History

"""--budget: after the first epoch the run is cut to the epochs that fit, its schedule spans the new count, and a
resumed run keeps the plan it made.

The first epoch is made slow on purpose (a callback sleeps before TimeBudget times it), so the plan is known:
a 3 s first epoch and a 10.5 s budget leave room for exactly two more epochs whatever the ~0.1 s of real
training on these 512 images costs (three epochs fit for any first epoch from 3.0 to 3.5 s).
"""

import json
import time

import pytest
import torch

from checkpoints import StopAfter
from cnnkit.config import fit_config
from cnnkit.engine.callbacks import Callback, TimeBudget
from cnnkit.engine.callbacks.budget import epochs_that_fit
from cnnkit.engine.callbacks.checkpoint import Checkpoint
from cnnkit.engine.checkpoint import planned_epochs, read_checkpoint
from cnnkit.engine.fit import fit
from cnnkit.engine.optim import SCHEDULES
from cnnkit.errors import CnnkitError
from cnnkit.models import build_model
from processes import run_torchrun
from slices import SHARED_DATA, mnist_dataset

OPTIONS = dict(epochs=10, batch_size=64, lr=3e-3, optimizer="adamw", schedule="onecycle", warmup=0.2,
               precision="fp32", seed=1)
FIRST_EPOCH_SECONDS, BUDGET = 3.0, 10.5


class SlowFirstEpoch(Callback):
    """Sleeps at the end of epoch 1, before TimeBudget (order 80) reads the epoch's time."""

    order = 50

    def on_epoch_end(self, epoch, logs):
        if epoch == 1:
            time.sleep(FIRST_EPOCH_SECONDS)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same kernels in the runs compared bit for bit
    yield
    torch.set_num_threads(threads)


def small_data():
    return mnist_dataset(limit_train=512, limit_eval=128)


def fresh_model():
    return build_model("fast", (1, 28, 28), 10, seed=1)


@pytest.mark.parametrize(("budget", "spent", "epoch", "seconds", "most", "expected"), [
    (100, 30, 1, 30, 10, 3),    # 70 s left: two more 30 s epochs
    (100, 30, 1, 30, 2, 2),     # never above the configured count
    (100, 120, 1, 120, 10, 1),  # the first epoch alone overran: stop after it
    (100, 10, 1, 10, 10, 10),   # everything fits
    (100, 0, 1, 0, 5, 5),       # an epoch timed at zero (a coarse clock) cuts nothing
])
def test_epochs_that_fit(budget, spent, epoch, seconds, most, expected):
    assert epochs_that_fit(budget, spent, epoch, seconds, most) == expected


def test_a_budget_cuts_the_run_and_its_schedule_ends_at_the_new_count():
    data = small_data()
    history = fit(fresh_model(), data, progress=False, callbacks=[SlowFirstEpoch(), TimeBudget(BUDGET)], **OPTIONS)
    assert history.epoch == [1, 2, 3]
    steps = int(history.steps["step"][-1])
    assert steps == 3 * 8  # 512 images at 64 a step
    # The learning rate of the last step is the schedule's over 3 epochs, not over the 10 configured.
    assert history.history["lr"][-1] == pytest.approx(SCHEDULES.get("onecycle")(steps - 1, steps, OPTIONS["lr"], 0.2))
    assert history.history["lr"][-1] != pytest.approx(SCHEDULES.get("onecycle")(steps - 1, 80, OPTIONS["lr"], 0.2))
    assert history.train_seconds < BUDGET


def test_a_generous_budget_changes_nothing():
    data = small_data()
    options = {**OPTIONS, "epochs": 2}
    plain_model, budget_model = fresh_model(), fresh_model()
    plain = fit(plain_model, data, progress=False, **options)
    budgeted = fit(budget_model, data, progress=False, budget=10_000, **options)
    assert budgeted.epoch == plain.epoch == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(plain_model.state_dict().values(), budget_model.state_dict().values()))


def test_a_resumed_run_keeps_its_plan_and_ends_as_the_uninterrupted_one(tmp_path):
    data = small_data()
    whole_model = fresh_model()
    whole = fit(whole_model, data, progress=False, callbacks=[SlowFirstEpoch()], budget=BUDGET, **OPTIONS)
    assert whole.epoch == [1, 2, 3]

    with pytest.raises(KeyboardInterrupt):
        fit(fresh_model(), data, progress=False, callbacks=[SlowFirstEpoch(), Checkpoint(tmp_path), StopAfter(2)],
            budget=BUDGET, **OPTIONS)
    saved = read_checkpoint(tmp_path)
    assert planned_epochs(saved, OPTIONS["epochs"]) == 3

    resumed_model = fresh_model()  # the resumed epochs are fast: the plan comes from the checkpoint, not a new timing
    resumed = fit(resumed_model, data, progress=False, resume=saved, budget=BUDGET, **OPTIONS)
    assert resumed.epoch == [1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(whole_model.state_dict().values(), resumed_model.state_dict().values()))


@pytest.mark.parametrize("value", [0, -5])
def test_a_budget_must_be_positive(value):
    with pytest.raises(CnnkitError, match="^budget must be at least 1"):
        fit_config(budget=value)


# Data-parallel ranks plan together: a real torchrun launch of two gloo processes whose first epochs differ

RANKS_PLAN = '''
import json, sys, time
import torch
import torch.distributed as dist
from cnnkit.data.tensors import load_dataset
from cnnkit.engine.callbacks import Callback, TimeBudget
from cnnkit.engine.distributed import shutdown_distributed
from cnnkit.engine.fit import fit
from cnnkit.models import build_model

class SlowFirstEpoch(Callback):
    """Rank 0's first epoch 1 s longer, rank 1's 5 s: alone they would plan ~8 and 2 epochs, together 3."""
    order = 50
    def on_epoch_end(self, epoch, logs):
        if epoch == 1:
            time.sleep({0: 1.0, 1: 5.0}[dist.get_rank()])

class FirstEpochSeconds(Callback):
    """The rank's own epoch-1 time, read just before TimeBudget (order 80) reads it."""
    order = 79
    def on_epoch_end(self, epoch, logs):
        if epoch == 1:
            self.seconds = self.state.seconds_in_epoch()

dist.init_process_group("gloo")
torch.set_num_threads(1)
data = load_dataset("mnist", sys.argv[1], limit_train=512, limit_eval=128, progress=False)
seconds, budget = FirstEpochSeconds(), TimeBudget(float(sys.argv[3]))
history = fit(build_model("fast", (1, 28, 28), 10, seed=1), data, progress=False,
              callbacks=[SlowFirstEpoch(), seconds, budget], epochs=10, batch_size=32, lr=3e-3, optimizer="adamw",
              schedule="onecycle", warmup=0.2, precision="fp32", seed=1)
report = {"seconds": seconds.seconds, "planned": budget.planned, "epochs": history.epoch,
          "steps": int(history.steps["step"][-1])}
with open(f"{sys.argv[2]}/rank{dist.get_rank()}.json", "w") as file:  # a file each: no shared stdout
    json.dump(report, file)
shutdown_distributed()  # cnnkit's exit: a barrier, then the group destroyed and its threads joined
'''


@pytest.mark.slow
def test_data_parallel_ranks_plan_the_same_epochs_from_their_mean_epoch_time(tmp_path):
    script = tmp_path / "plan.py"
    script.write_text(RANKS_PLAN)
    # Ranks planning alone fail the launch (measured: rank 1 stops after 2 epochs, rank 0's next all-reduce raises).
    result = run_torchrun(script, SHARED_DATA, tmp_path, str(BUDGET))
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    mean = (ranks[0]["seconds"] + ranks[1]["seconds"]) / 2
    planned = epochs_that_fit(BUDGET, mean, 1, mean, 10)
    alone = [epochs_that_fit(BUDGET, rank["seconds"], 1, rank["seconds"], 10) for rank in ranks]
    assert planned not in alone and alone[0] != alone[1], (ranks, planned)  # the mean is what decided
    for rank in ranks:
        assert rank["planned"] == planned and rank["epochs"] == list(range(1, planned + 1))
    assert ranks[0]["steps"] == ranks[1]["steps"] == planned * 8  # 512 images at 2 x 32 a step

"""Data-parallel training on torch.distributed: shards, real torchrun launches (gloo on CPU), DDP resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cnnkit.api import evaluate_run
from cnnkit.data.tensors import batch_indices, batches_per_epoch
from cnnkit.engine.fit import fit
from cnnkit.errors import CnnkitError
from cnnkit.models import build_model
from cnnkit.models.classifier import head_parameters
from checkpoints import wait_for_checkpoint
from processes import run_cnnkit, run_torchrun, start_cnnkit
from slices import SHARED_DATA, mnist_dataset


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("num_items, batch_size", [(1000, 32), (1001, 32), (97, 8), (65, 16), (7, 1), (130, 64)])
def test_the_ranks_shards_cover_every_epoch_exactly_once_in_equal_steps(num_items, batch_size, world_size):
    seen = []
    steps = []
    for rank in range(world_size):
        generator = torch.Generator().manual_seed(5)  # every rank seeds the same: the same permutation
        batches = list(batch_indices(num_items, batch_size, generator=generator, rank=rank, world_size=world_size))
        steps.append(len(batches))
        assert all(0 < len(batch) <= 2 * batch_size for batch in batches)
        seen += [int(i) for batch in batches for i in batch]
    assert sorted(seen) == list(range(num_items))  # none dropped, none repeated
    assert steps == [batches_per_epoch(num_items, batch_size, world_size)] * world_size  # DDP: the same step count


def test_one_process_batches_are_unchanged_by_sharding_support():
    order = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    batches = list(batch_indices(100, 32, generator=torch.Generator().manual_seed(1)))
    assert [len(b) for b in batches] == [32, 32, 32, 4] and torch.equal(torch.cat(batches), order)
    assert batches_per_epoch(100, 32) == 4


def test_fit_refuses_a_rank_without_a_process_group():
    data = mnist_dataset(limit_train=200, limit_eval=100)
    with pytest.raises(CnnkitError, match="start the processes with torchrun"):
        fit(build_model("fast", (1, 28, 28), 10), data, epochs=1, progress=False, rank=1, world_size=2)


# ----------------------------------------------------------------------------------------------------
# Real launches: torchrun's own launcher, two gloo processes on this machine

TRAIN = ["train", "--data-dir", str(SHARED_DATA), "--limit-train", "4000", "--limit-eval", "1000", "--model", "fast",
         "--batch-size", "64", "--optimizer", "adamw", "--lr", "3e-3", "--schedule", "onecycle", "--precision", "fp32",
         "--quiet"]


def run_files(run: Path) -> tuple[dict, list[str], dict]:
    rows = (run / "history.csv").read_text().splitlines()
    keep = [i for i, key in enumerate(rows[0].split(",")) if key != "seconds"]
    history = [",".join(row.split(",")[i] for i in keep) for row in rows]
    return load_file(str(run / "model.safetensors")), history, json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes_trains_like_one_and_writes_one_run(tmp_path):
    runs = tmp_path / "runs"
    one = run_cnnkit(*TRAIN, "--epochs", "2", "--threads", "1",
                     "--runs-dir", str(runs), "--name", "one", timeout=600)
    assert one.returncode == 0, one.stderr
    two = run_torchrun("-m", "cnnkit", *TRAIN, "--epochs", "2", "--runs-dir", runs, "--name", "two", timeout=600)
    assert two.returncode == 0, two.stderr
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]  # rank 1 wrote nothing of its own
    assert two.stdout.count("test accuracy") == 1  # and printed nothing: rank 0 reports
    _, history, metrics = run_files(runs / "two")
    _, _, single = run_files(runs / "one")
    assert metrics["processes"] == 2 and metrics["num_train"] == single["num_train"]
    # Two processes of 64 images step on 128 at a time (half the steps): the same accuracy band.
    assert single["test_accuracy"] > 0.93 and metrics["test_accuracy"] > 0.93, (single, metrics)
    assert abs(single["test_accuracy"] - metrics["test_accuracy"]) < 0.03
    # The test set was scored in two halves (images 0, 2, 4, ... and 1, 3, 5, ...) and gathered: the report is
    # the one a single process gives for the saved model, confusion matrix and loss included.
    alone = evaluate_run(runs / "two", str(SHARED_DATA), limit=1000, progress=False)
    assert alone.confusion.tolist() == metrics["test_report"]["confusion_matrix"]
    assert alone.loss == pytest.approx(metrics["test_loss"], abs=1e-5)


@pytest.mark.slow
def test_head_only_epochs_train_on_two_processes_and_keep_the_backbone_until_they_end(tmp_path):
    """--freeze-epochs with --devices 2: DDP is built before the backbone's first epochs without gradients, and
    once failed waiting for them. A head-only epoch on two processes leaves every backbone parameter at its starting
    weights (the seed's, as build_model draws them); the epoch after it trains them."""
    runs = tmp_path / "runs"
    for name, epochs in (("frozen", 1), ("after", 2)):
        result = run_cnnkit(*TRAIN, "--limit-train", "1000", "--limit-eval", "200", "--devices", "2", "--epochs",
                            str(epochs), "--freeze-epochs", "1", "--no-checkpoint", "--runs-dir", str(runs), "--name",
                            name, timeout=600)
        assert result.returncode == 0, result.stderr
    model = build_model("fast", (1, 28, 28), 10)  # seed 0, the command's
    start = model.state_dict()
    head = {id(parameter) for parameter in head_parameters(model)}
    backbone = [name for name, parameter in model.named_parameters() if id(parameter) not in head]
    head_keys = [name for name, parameter in model.named_parameters() if id(parameter) in head]
    (frozen, _, metrics), (after, history, _) = (run_files(runs / name) for name in ("frozen", "after"))
    assert metrics["processes"] == 2 and len(history) == 3  # the header and two epochs
    assert len(backbone) >= 4 and all(torch.equal(frozen[key], start[key]) for key in backbone)
    assert head_keys and not any(torch.equal(frozen[key], start[key]) for key in head_keys)  # the head trained
    assert [key for key in backbone if torch.equal(after[key], start[key])] == []


@pytest.mark.slow
def test_a_two_process_run_killed_after_an_epoch_resumes_to_the_uninterrupted_weights(tmp_path):
    command = [*TRAIN, "--devices", "2", "--epochs", "2", "--ema", "0.9"]
    # The launch leaves no folder of its own in the temporary folder (torchrun's launcher makes one for logs by
    # default); torch's per-user compile cache (torchinductor_USER), shared by every run, may be there.
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    whole = run_cnnkit(*command, "--runs-dir", str(tmp_path / "whole"), "--name", "r", timeout=600,
                       env={**os.environ, "TMPDIR": str(temporary)})
    assert whole.returncode == 0, whole.stderr
    assert [path.name for path in temporary.iterdir() if not path.name.startswith("torchinductor_")] == []

    runs = tmp_path / "runs"
    process = start_cnnkit(*command, "--runs-dir", str(runs), "--name", "r", start_new_session=True)
    staging = wait_for_checkpoint(runs, 1, process)
    # Kills the launcher's group only: torchrun puts its workers in sessions of their own, so this also checks that
    # they die with it (cnnkit.lifetime); a surviving rank 0 would finish and rename the staging directory away.
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    # From Python, without torchrun, it would resume in one process: refused, naming the command that resumes it.
    in_python = subprocess.run([sys.executable, "-c", f"import cnnkit; cnnkit.resume({str(staging)!r})"],
                               capture_output=True, text=True, timeout=120)
    assert f"cnnkit.errors.CnnkitError: devices=2 trains in 2 processes, which a Python call cannot start: run " \
           f"`cnnkit train --resume {staging}`" in in_python.stderr, in_python.stderr
    resumed = run_cnnkit("train", "--resume", str(staging), "--quiet", timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    weights, history, metrics = run_files(runs / "r")
    expected_weights, expected_history, expected = run_files(tmp_path / "whole" / "r")
    assert metrics["processes"] == 2 and history == expected_history
    assert all(torch.equal(weights[key], expected_weights[key]) for key in expected_weights)
    assert metrics["test_accuracy"] == expected["test_accuracy"]



@pytest.mark.parametrize("flags, error", [
    (["--stage-lr-decay", "0.5"], "cnnkit: error: --stage-lr-decay 0.5: fast is not built in stages"),
    (["--device", "cuda"], "cnnkit: error: --device cuda was asked for, but PyTorch sees no CUDA GPU"),
])
def test_what_every_process_refuses_is_said_once_in_one_line(flags, error, tmp_path):
    """Each process refuses the same option once it has the model (or the device): their lines reach the launcher,
    which prints each once, without torch's "failed (exitcode: 1)" line or the stopped process's "interrupted"
    (4 lines before), and leaves nothing in the temporary folder."""
    if torch.cuda.is_available() and "cuda" in flags:
        pytest.skip("this machine has a CUDA GPU")
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result = run_cnnkit(*TRAIN, "--devices", "2", "--epochs", "1", *flags, "--runs-dir", str(tmp_path / "runs"),
                        env={**os.environ, "TMPDIR": str(temporary)}, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith(error), result.stderr
    assert [path.name for path in temporary.iterdir() if not path.name.startswith("torchinductor_")] == []


@pytest.mark.slow
def test_ctrl_c_on_a_two_process_run_stops_every_process_and_says_how_to_resume(tmp_path):
    """Ctrl-C reaches the launcher (the terminal's foreground group; torchrun's workers sit in sessions of their
    own): it passes the signal on, rank 0 names the checkpoint in the one line printed, and the command ends by
    SIGINT at once, as one process does."""
    runs = tmp_path / "runs"
    process = start_cnnkit(*TRAIN, "--devices", "2", "--epochs", "300", "--runs-dir", str(runs), "--name", "r",
                           start_new_session=True)
    staging = wait_for_checkpoint(runs, 1, process)
    os.killpg(process.pid, signal.SIGINT)
    interrupted = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGINT, stderr
    # torchrun kills a process still there 30 s after passing the signal on: a rank that hung on its way out (one
    # stopped mid all-reduce once did, 2 of 8 launches with the cores busy) is caught by the time, and its
    # message lost. Measured: 0.4-0.6 s.
    assert time.monotonic() - interrupted < 25, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]  # rank 0's, and no launcher chatter
    assert len(lines) == 1 and f"cnnkit train --resume {staging}" in lines[0], stderr
    deadline = time.monotonic() + 60
    while subprocess.run(["pgrep", "-f", str(runs)], capture_output=True).returncode == 0:  # a rank still alive
        assert time.monotonic() < deadline, "a training process outlived the interrupted command"
        time.sleep(0.2)
    assert staging.is_dir() and not (runs / "r").exists()


def rank_process(runs: Path, rank: int) -> int:
    """The pid of the training process of `rank` whose command line names `runs` (its environment says RANK)."""
    listed = subprocess.run(["pgrep", "-f", str(runs)], capture_output=True, text=True).stdout.split()
    for pid in map(int, listed):
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environment:
            return pid
    raise AssertionError(f"no process of rank {rank} among {listed}")


@pytest.mark.slow
def test_a_process_killed_outright_is_named_with_the_checkpoint_the_others_kept(tmp_path):
    """Rank 1 killed by SIGKILL (as the kernel's out-of-memory killer does). Rank 0 finds its peer gone in its next
    collective and says so with the checkpoint to resume from (it printed gloo's traceback); or, stopped by the
    launcher first, it names the checkpoint and the launcher the failure (only "interrupted" showed, exit 130)."""
    runs = tmp_path / "runs"
    process = start_cnnkit(*TRAIN, "--devices", "2", "--epochs", "300", "--runs-dir", str(runs), "--name", "r",
                           start_new_session=True)
    staging = wait_for_checkpoint(runs, 1, process)
    os.kill(rank_process(runs, 1), signal.SIGKILL)
    _, stderr = process.communicate(timeout=120)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert process.returncode == 1 and f"cnnkit train --resume {staging}" in lines[0], stderr
    gone = "cnnkit: error: another training process of this run ended without a word (killed, perhaps for memory)"
    failed = "cnnkit: error: a training process failed (exit code -9"
    assert (len(lines) == 1 and lines[0].startswith(gone)) or (len(lines) == 2 and lines[1].startswith(failed)), stderr


SHARDED_SCORING = '''
import sys
import torch
import torch.distributed as dist
from torch import nn
from cnnkit.data.tensors import Split
from cnnkit.engine.distributed import current_world, shutdown_distributed
from cnnkit.engine.evaluate import sharded_logits
from cnnkit.engine.inference import predict_logits

class Counting(nn.Module):
    """A real model (BatchNorm and a linear layer) that counts the images it is shown."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm, self.linear, self.seen = nn.BatchNorm2d(1), nn.Linear(16, 3), 0
    def forward(self, images):
        self.seen += len(images)
        return self.linear(self.norm(images.float()).flatten(1))

dist.init_process_group("gloo")
world = current_world()
model = Counting()
model.norm.running_mean.fill_(float(world.rank))  # drifted statistics: rank 0's must win
size = int(sys.argv[1])
generator = torch.Generator().manual_seed(1)
split = Split(torch.randint(0, 256, (size, 1, 4, 4), dtype=torch.uint8, generator=generator),
              torch.randint(0, 3, (size,), generator=generator))
logits = sharded_logits(model, split, world, batch_size=4)
seen = model.seen
assert torch.equal(model.norm.running_mean, torch.zeros(1)), model.norm.running_mean
expected = predict_logits(model, split.images, batch_size=7)
assert logits.shape == expected.shape and torch.allclose(logits, expected, atol=1e-6), (logits, expected)
with open(f"{sys.argv[2]}/rank{world.rank}.txt", "w") as report:  # a file each: no shared stdout to interleave
    report.write(str(seen))
shutdown_distributed()  # cnnkit's exit: a barrier, then the group destroyed and its threads joined
'''


@pytest.mark.parametrize("size", [11, 12])
def test_test_scoring_is_split_between_the_processes_and_gathered_in_order(tmp_path, size):
    script = tmp_path / "score.py"
    script.write_text(SHARDED_SCORING)
    result = run_torchrun(script, str(size), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    shares = sorted(int((tmp_path / f"rank{rank}.txt").read_text()) for rank in range(2))
    assert shares == [size // 2, size - size // 2]  # each image scored once, by one process


# Leaving the process group joins its threads, whichever was first: the group or cnnkit's import

CLEAN_EXIT = '''
import os, sys
import torch
import torch.distributed as dist
if sys.argv[1] == "group-first":
    dist.init_process_group("gloo")
from cnnkit.engine.distributed import current_world, shutdown_distributed, wrap_model
if not dist.is_initialized():
    dist.init_process_group("gloo")
model = wrap_model(torch.nn.Linear(3, 2), torch.device("cpu"), current_world())  # DistributedDataParallel
model(torch.ones(4, 3)).sum().backward()
del model
works = [dist.all_reduce(torch.ones(100_000), async_op=True) for _ in range(20)]
del works  # in flight: until they finish, gloo's threads hold the last references to these tensors
shutdown_distributed()
threads = sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))
with open(f"{sys.argv[2]}/rank{dist.get_rank() if dist.is_initialized() else os.environ['RANK']}.txt", "w") as f:
    f.write(" ".join(threads))
'''


@pytest.mark.parametrize("order", ["cnnkit-first", "group-first"])
def test_leaving_the_process_group_joins_its_threads_before_python_exits(tmp_path, order):
    # Measured before: DistributedDataParallel pinned the group (torch.distributed.nn.functional's defaults), its gloo
    # threads outlived destroy_process_group, and in 4 of 5 launches like this one a rank aborted at exit.
    script = tmp_path / "leave.py"
    script.write_text(CLEAN_EXIT)
    result = run_torchrun(script, order, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in range(2):
        threads = (tmp_path / f"rank{rank}.txt").read_text().split()
        assert not [name for name in threads if "gloo" in name], threads

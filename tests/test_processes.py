"""The suite's ways of running a command (`processes.run_cnnkit`, `processes.start_cnnkit`): a command forked
from the torch-importing server gives what the same command started the plain way gives, byte for byte, and is a
process of its own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

import processes
from processes import Started, run_cnnkit, start_cnnkit
from slices import SHARED_DATA

TRAIN = ("train", "--data-dir", str(SHARED_DATA), "--limit-train", "256", "--limit-eval", "200", "--epochs", "1",
         "--seed", "3", "--no-checkpoint")


def both_ways(monkeypatch: pytest.MonkeyPatch, *args: str, **options) -> dict[str, subprocess.CompletedProcess]:
    results = {}
    for way, setting in (("forked", "1"), ("plain", "0")):
        monkeypatch.setenv("CNNKIT_TEST_FORK", setting)
        results[way] = run_cnnkit(*(arg.format(way=way) for arg in args), **options)
    assert processes._zygote is not None and processes._zygote.process.poll() is None, "the server served"
    return results


def test_a_forked_training_writes_the_same_run_and_says_the_same_as_a_plain_one(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    done = both_ways(monkeypatch, *TRAIN, "--runs-dir", str(runs), "--name", "{way}", "--quiet")
    def said(way: str) -> list[str]:  # but the time and memory it took
        lines = done[way].stdout.replace(str(runs / way), "RUN").splitlines()
        return [re.sub(r"[\d.]+(s|s/epoch| MB)\b", "#", line) for line in lines]

    for way, result in done.items():
        assert result.returncode == 0 and result.stderr == done["plain"].stderr, result.stderr
    assert said("forked") == said("plain") and any("#" in line for line in said("plain"))

    weights = {way: load_file(runs / way / "model.safetensors") for way in done}  # the file's header order varies
    assert weights["forked"].keys() == weights["plain"].keys()
    assert all(torch.equal(weights["forked"][key], weights["plain"][key]) for key in weights["plain"])
    metrics = {way: json.loads((runs / way / "metrics.json").read_text()) for way in done}
    assert metrics["forked"]["test_accuracy"] == metrics["plain"]["test_accuracy"] > 0.1  # above chance


def test_a_forked_command_gets_its_own_arguments_directory_environment_and_exit_status(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    listed = both_ways(monkeypatch, "runs", "runs", cwd=tmp_path)  # relative to its own working directory
    assert listed["forked"].returncode == listed["plain"].returncode == 0, listed["forked"].stderr
    assert listed["forked"].stdout == listed["plain"].stdout
    for env in ({**os.environ}, {**os.environ, "CNNKIT_DEBUG": "1"}):
        refused = both_ways(monkeypatch, "runs", str(tmp_path / "nowhere"), env=env)
        assert refused["forked"].returncode == refused["plain"].returncode == 1
        forked, plain = (refused[way].stderr.splitlines() for way in ("forked", "plain"))
        assert forked[-1] == plain[-1] and "does not exist" in forked[-1]
        assert forked[0].startswith("Traceback") == plain[0].startswith("Traceback") == ("CNNKIT_DEBUG" in env)


def test_a_forked_command_is_a_process_of_its_own_and_past_its_timeout_it_is_killed(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_TEST_FORK", "1")
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_cnnkit(*TRAIN, "--epochs", "300", "--runs-dir", str(tmp_path), "--name", "slow", timeout=5)
    assert time.monotonic() - started < 30
    pid = int((tmp_path / ".slow.lock").read_text())  # the training's claim on its name, left by the kill
    assert pid not in (os.getpid(), processes._zygote.process.pid)
    assert not os.path.exists(f"/proc/{pid}"), "killed and reaped before run_cnnkit raised"


def test_a_started_command_is_forked_and_leads_its_own_session_when_asked(tmp_path, monkeypatch):
    """`start_cnnkit`, the suite's Popen: forked (not quietly started the plain way), in a session and process
    group of its own with start_new_session, so a test's killpg reaches it and nothing else."""
    monkeypatch.setenv("CNNKIT_TEST_FORK", "1")
    process = start_cnnkit(*TRAIN, "--epochs", "300", "--runs-dir", str(tmp_path), "--name", "slow",
                           start_new_session=True)
    assert isinstance(process, Started)
    deadline = time.monotonic() + 60
    while not (tmp_path / ".slow.lock").is_file():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.01)
    assert os.getsid(process.pid) == os.getpgid(process.pid) == process.pid != os.getsid(0)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL
    out, err = process.communicate(timeout=30)  # text, read to its end, as Popen(text=True) gives
    assert isinstance(out, str) and isinstance(err, str) and "Traceback" not in err


def test_a_request_too_big_for_the_server_runs_the_plain_way_and_the_server_goes_on(monkeypatch):
    monkeypatch.setenv("CNNKIT_TEST_FORK", "1")
    many = [f"/nowhere/{index:04d}{'x' * 90}" for index in range(2500)]  # ~250 KB of arguments: past one message
    refused = run_cnnkit("runs", *many)
    assert refused.returncode == 2 and "unrecognized arguments: /nowhere/0001" in refused.stderr  # argparse's
    assert processes._zygote.process.poll() is None and run_cnnkit("--version").stdout.startswith("cnnkit ")

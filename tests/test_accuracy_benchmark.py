"""benchmarks/accuracy.py: the commands it runs, what it reads from a run, and how it rewrites RESULTS.md."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "accuracy.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


def test_dry_run_prints_one_train_command_per_seed():
    result = run_script("mnist-best", "--seeds", "2", "--dry-run", "--no-peer")
    assert result.returncode == 0, result.stderr
    commands = [line for line in result.stdout.splitlines() if " cnnkit train " in line]
    assert len(commands) == 2
    for seed, command in enumerate(commands):
        assert "--preset mnist-best" in command and f"--seed {seed} " in command and "--quiet" in command
        assert "--data-dir" in command and "--dataset" not in command  # MNIST: the preset's own dataset
    assert "not timed (--no-peer)" in result.stdout


def test_dry_run_gives_cifar_presets_the_jpeg_folder():
    result = run_script("cifar10-fast", "--seeds", "1", "--dry-run", "--no-peer", "--threads", "1")
    assert result.returncode == 0, result.stderr
    (command,) = [line for line in result.stdout.splitlines() if " cnnkit train " in line]
    assert re.search(r"--dataset imagefolder:\S+/cifar10-jpg", command) and "--threads 1" in command


def test_unknown_preset_is_one_line_error():
    result = run_script("cifar10-fastest", "--dry-run", "--no-peer")
    assert result.returncode == 2
    assert "unknown preset 'cifar10-fastest'" in result.stderr and "Traceback" not in result.stderr


def test_first_crossing_counts_ema_weights_and_sums_epoch_seconds(tmp_path):
    bench = load_benchmark()
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss,val_accuracy,ema_val_accuracy,seconds\n"
                       "1,1.0,0.80,nan,10.0\n2,0.5,0.89,0.905,12.5\n3,0.4,0.93,0.94,11.0\n")
    assert bench.first_crossing(history, 0.90) == (2, 22.5)
    assert bench.first_crossing(history, 0.95) == (None, None)


def test_results_keep_other_presets_tables(tmp_path):
    bench = load_benchmark()
    results = tmp_path / "RESULTS.md"
    results.write_text("# Other benchmark\n\nkept text\n")
    bench.update_results(results, "cifar10-fast", "## cifar10-fast first\n")
    bench.update_results(results, "mnist-best", "## mnist-best first\n")
    bench.update_results(results, "cifar10-fast", "## cifar10-fast second\n")
    text = results.read_text()
    assert text.startswith("# Other benchmark\n\nkept text\n")
    assert "cifar10-fast first" not in text and text.count("cifar10-fast second") == 1
    assert "mnist-best first" in text
    assert text.index("mnist-best first") < text.index("cifar10-fast second")  # the order, not run order
    assert text.count("<!-- accuracy:start -->") == 1 and text.count("<!-- accuracy:end -->") == 1


@pytest.mark.slow
def test_real_run_writes_its_table(tmp_path, shared_data):
    """One real (tiny) `cnnkit train` through the script: the table reads the run's own metrics."""
    output = tmp_path / "RESULTS.md"
    result = run_script("fast", "--seeds", "1", "--no-peer", "--data-dir", str(shared_data), "--output", str(output),
                        "--", "--limit-train", "300", "--limit-eval", "100", "--threads", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    text = output.read_text()
    section = text.split("<!-- accuracy-fast:start -->", 1)[1].split("<!-- accuracy-fast:end -->", 1)[0]
    seed_row = re.search(r"^\| 0 \| (\d+\.\d\d) \|", section, re.M)
    assert seed_row and 0 < float(seed_row.group(1)) <= 100
    assert "**1 seeds**" in section and "not timed" in section and "cpu, " in section
    assert "-- --limit-train 300 --limit-eval 100 --threads 1" in section  # the cut-down run says so


def test_peer_time_is_reused_from_todays_cache(tmp_path, monkeypatch):
    """A second invocation on the same machine and day reads the cached Keras time instead of re-timing it."""
    import json
    import time

    bench = load_benchmark()
    cache = tmp_path / "peer-time.json"
    monkeypatch.setattr(bench, "PEER_CACHE", cache)
    cache.write_text(json.dumps({bench.peer_key(): {"fit_seconds": 91.5, "test_accuracy": 0.991,
                                                    "timed_at": time.strftime("%Y-%m-%dT09:05:00")}}))
    peer, note = bench.peer_time(tmp_path / "no-data-here")  # timing it for real would fail: no MNIST there
    assert peer.fit_seconds == 91.5 and note.startswith("cached")
    assert "peer timed at 09:05 today" in peer.describe()
    cache.write_text(json.dumps({"1999-01-01 | " + bench.peer_key().split(" | ", 1)[1]: {
        "fit_seconds": 1.0, "test_accuracy": 0.5, "timed_at": "1999-01-01T09:05:00"}}))
    assert bench.cached_peer() is None  # another day's figure is not reused


def results_writer():
    """benchmarks/mnist_speed.py, whose write_results every benchmark uses to rewrite its block of RESULTS.md."""
    load_benchmark()  # puts benchmarks/ on sys.path and imports mnist_speed from there
    return sys.modules["mnist_speed"]


def test_a_block_holding_hand_written_sections_is_refused_and_the_file_left_as_it_was(tmp_path, capsys):
    """A benchmark rewrites everything between its markers, so a section written by hand inside them would be
    lost: the rewrite is refused, the file unchanged, and the new table printed instead."""
    results = tmp_path / "RESULTS.md"
    original = ("<!-- transfer:start -->\n## Seed runs by hand (hand-written, 2026-12-06)\n\nnotes\n\n"
                "# Transfer: the generated table\n<!-- transfer:end -->\n")
    results.write_text(original)
    with pytest.raises(SystemExit, match="holds hand-written sections"):
        results_writer().write_results(results, "# Transfer: a new table\n", "<!-- transfer:start -->",
                                       "<!-- transfer:end -->")
    assert results.read_text() == original
    assert "# Transfer: a new table" in capsys.readouterr().out


def test_no_hand_written_section_of_results_md_sits_inside_a_generated_block():
    text = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    writer = results_writer()
    blocks = {name: text.split(f"<!-- {name}:start -->")[1].split(f"<!-- {name}:end -->")[0]
              for name in re.findall(r"<!-- (\S+):start -->", text)}
    inside = {name: writer.hand_written_headings(block) for name, block in blocks.items()}
    assert {name: headings for name, headings in inside.items() if headings} == {}

"""MNIST speed, side by side: the tutorial's Keras script vs cnnkit's seed recipe vs cnnkit's `fast` preset.

    python benchmarks/mnist_speed.py [--seeds 5] [--data-dir ../shared/data]

Everything runs in this one invocation, on the same machine and data, one process at a time. The Keras
peer (../shared/peers/seed_keras.py) runs in its own virtual environment with tensorflow-cpu, created on
first use (never a project dependency); if that is impossible the benchmark says so and goes on.
Each row is a separate `cnnkit train` process, so its wall time includes start-up and data loading.
Prints one table and writes it, with the machine it ran on, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PEER_SCRIPT = SHARED / "peers" / "seed_keras.py"
PEER_VENV = Path(os.environ.get("CNNKIT_PEER_VENV", Path.home() / ".cache" / "cnnkit" / "peer-venv"))
TARGET = 0.99


@dataclass
class Row:
    name: str
    runs: int = 0
    test_accuracy: list[float] = field(default_factory=list)
    time_to_target: list[float | None] = field(default_factory=list)
    seconds_per_epoch: list[float] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    wall_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    note: str = ""


def run_measured(command: list[str], env: dict | None = None) -> tuple[str, float, float, int]:
    """Run a command; return (stdout+stderr, wall seconds, peak RSS MiB of that process, exit code)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **(env or {})})
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    return output, wall, usage.ru_maxrss / 1024, process.returncode


# ----------------------------------------------------------------------------------------------------
# The Keras peer

def ensure_peer_venv() -> Path | None:
    """The peer's python, creating its venv with tensorflow-cpu if needed; None (with a message) if impossible."""
    python = PEER_VENV / "bin" / "python"
    check = [str(python), "-c", "import tensorflow, matplotlib, numpy"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"creating the Keras peer's virtual environment in {PEER_VENV} (tensorflow-cpu) ...", flush=True)
    steps = [[sys.executable, "-m", "venv", str(PEER_VENV)],
             [str(python), "-m", "pip", "install", "--quiet", "tensorflow-cpu", "numpy", "matplotlib"]]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"cannot set up the Keras peer ({' '.join(step[:4])} ...): {result.stderr.strip()[-300:]}")
            return None
    return python if subprocess.run(check, capture_output=True).returncode == 0 else None


def parse_keras_epochs(output: str) -> tuple[list[float], list[float]]:
    """Per-epoch (seconds, val_accuracy) from Keras's verbose=2 lines."""
    seconds, val_accuracy = [], []
    for line in output.splitlines():
        match = re.search(r" - (\d+(?:\.\d+)?)(m?s) - .*val_accuracy: ([0-9.]+)", line)
        if match:
            value = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
            seconds.append(value)
            val_accuracy.append(float(match.group(3)))
    return seconds, val_accuracy


def run_peer(data_dir: Path, epochs: int, runs: int) -> Row:
    """The tutorial's script, `runs` times: TensorFlow is not seeded, so its time to 99% varies by run."""
    row = Row("Keras peer (tutorial script, TensorFlow)")
    if not PEER_SCRIPT.exists():
        row.note = f"peer script not found at {PEER_SCRIPT}"
        return row
    python = ensure_peer_venv()
    if python is None:
        row.note = "tensorflow-cpu could not be installed: peer not measured"
        return row
    for run in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            output, wall, rss, code = run_measured(
                [str(python), str(PEER_SCRIPT), str(data_dir / "mnist"), str(epochs), f"{tmp}/plot.png"],
                env={"TF_CPP_MIN_LOG_LEVEL": "2"})
        fit = re.search(r"fit_seconds ([0-9.]+)", output)
        test = re.search(r"test_accuracy ([0-9.]+)", output)
        if code != 0 or not fit or not test:
            row.note = f"peer failed (exit {code}): {output.strip()[-300:]}"
            return row
        fit_seconds = float(fit.group(1))
        epoch_seconds, val_accuracy = parse_keras_epochs(output)
        # Keras rounds per-epoch times to whole seconds: scale them to the measured fit() total.
        scale = fit_seconds / sum(epoch_seconds) if epoch_seconds and sum(epoch_seconds) else 1.0
        cumulative = [sum(epoch_seconds[: i + 1]) * scale for i in range(len(epoch_seconds))]
        reached = next((cumulative[i] for i, acc in enumerate(val_accuracy) if acc >= TARGET), None)
        row.runs += 1
        row.test_accuracy.append(float(test.group(1)))
        row.time_to_target.append(reached)
        row.seconds_per_epoch.append(fit_seconds / epochs)
        row.train_seconds.append(fit_seconds)
        row.wall_seconds.append(wall)
        row.peak_rss_mb.append(rss)
        print(f"  Keras peer run {run + 1}: test {float(test.group(1)):.4f}, fit {fit_seconds:.1f}s, "
              f"99% after {fmt(reached, '.1f')}s", flush=True)
    row.note = "validates on the test set every epoch, as the tutorial does"
    return row


# ----------------------------------------------------------------------------------------------------
# cnnkit rows

def run_cnnkit(name: str, args: list[str], seeds: list[int], data_dir: Path, note: str) -> Row:
    row = Row(name, note=note)
    with tempfile.TemporaryDirectory() as runs:
        for seed in seeds:
            command = [sys.executable, "-m", "cnnkit", "train", *args, "--seed", str(seed), "--data-dir",
                       str(data_dir), "--runs-dir", runs, "--name", f"seed{seed}", "--quiet"]
            output, wall, rss, code = run_measured(command)
            if code != 0:
                row.note = f"failed (exit {code}): {output.strip()[-300:]}"
                return row
            run_dir = Path(runs) / f"seed{seed}"
            metrics = json.loads((run_dir / "metrics.json").read_text())
            row.runs += 1
            row.test_accuracy.append(metrics["test_accuracy"])
            row.time_to_target.append(time_to_target(run_dir, metrics))
            row.seconds_per_epoch.append(metrics["seconds_per_epoch"])
            row.train_seconds.append(metrics["train_seconds"])
            row.wall_seconds.append(wall)
            row.peak_rss_mb.append(rss)
            print(f"  {name} seed {seed}: test {metrics['test_accuracy']:.4f}, train {metrics['train_seconds']:.2f}s,"
                  f" wall {wall:.2f}s, RSS {rss:.0f} MB", flush=True)
    return row


def time_to_target(run_dir: Path, metrics: dict) -> float | None:
    """Seconds of training until test accuracy >= 99%.

    With --val test the test set is scored after every epoch (the tutorial's protocol), so the first
    epoch reaching 99% is read from history.csv; otherwise the test set is scored once, at the end,
    and the time counts only if that final score reaches 99%.
    """
    if metrics.get("val_source") == "test":
        return metrics.get("val_99_seconds")
    return metrics["train_seconds"] if metrics["test_accuracy"] >= TARGET else None


# ----------------------------------------------------------------------------------------------------
# Report

def mean(values):
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def fmt(value, spec=".2f", missing="—"):
    return missing if value is None else format(value, spec)


def table_rows(rows: list[Row]) -> list[list[str]]:
    peer = rows[0] if rows and rows[0].runs else None
    peer_target = mean(peer.time_to_target) if peer else None
    peer_epoch = mean(peer.seconds_per_epoch) if peer else None
    lines = []
    for row in rows:
        if not row.runs:
            lines.append([row.name, "0", "—", "—", "—", "—", "—", "—", "—", "—", row.note])
            continue
        accs = [100 * a for a in row.test_accuracy]
        spread = f"{statistics.fmean(accs):.2f} ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else f"{accs[0]:.2f}"
        all_reached = all(t is not None for t in row.time_to_target)
        target = mean(row.time_to_target) if all_reached else None
        speedup = peer_target / target if peer_target and target else None
        epoch_speedup = peer_epoch / mean(row.seconds_per_epoch) if peer_epoch else None
        lines.append([row.name, str(row.runs), fmt(target), spread, f"{min(accs):.2f}", fmt(mean(row.seconds_per_epoch)),
                      fmt(mean(row.wall_seconds)), fmt(mean(row.peak_rss_mb), ".0f"),
                      fmt(speedup, ".1f") + ("x" if speedup else ""),
                      fmt(epoch_speedup, ".2f") + ("x" if epoch_speedup else ""), row.note])
    return lines


HEADER = ["row", "runs", "time to 99% test (s)", "test acc % mean ± std", "min %", "s / epoch", "wall s",
          "peak RSS MB", "speed-up to 99%", "speed-up / epoch", "note"]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {platform.system()} {platform.release()}")


def markdown(rows: list[list[str]], args: argparse.Namespace) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join([
        "# MNIST speed: Keras tutorial vs cnnkit",
        "",
        f"Command: `python benchmarks/mnist_speed.py --seeds {args.seeds} --seed-runs {args.seed_runs}"
        f" --peer-runs {args.peer_runs}`"
        f" ({time.strftime('%Y-%m-%d')})",
        f"Machine: {machine()}",
        "",
        *lines,
        "",
        "Time to 99% test: for the peer and the seed recipe (`--val test`, the tutorial's protocol) the training",
        "seconds until the epoch whose test accuracy first reached 99.0%; for `fast` (validation held out",
        "of train, test scored once at the end) the whole training time, counted only when every seed's final",
        "test accuracy is at least 99.0%. Speed-ups are the peer's figure divided by the row's.",
        "Wall s is the whole command (start-up, data loading, evaluation, plots and saving included).",
        "",
    ])


START, END = "<!-- mnist_speed:start -->", "<!-- mnist_speed:end -->"


def hand_written_headings(text: str) -> list[str]:
    """The headings in `text` of sections written by hand (RESULTS.md's convention: "(hand-written, DATE)")."""
    return [line for line in text.splitlines() if line.startswith("#") and "hand-written" in line]


def write_results(path: Path, table: str, start: str = START, end: str = END) -> None:
    """Replace the generated block of RESULTS.md between `start` and `end`, keeping everything else.

    A block not yet in the file goes first for this benchmark's own markers, last for any other's.
    """
    block = f"{start}\n{table}{end}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if start in text and end in text:
        if written := hand_written_headings(text.split(start, 1)[1].split(end, 1)[0]):
            print(block)  # the measurement is not lost with the refusal
            raise SystemExit(f"{path}: the block between {start} and {end} holds hand-written sections "
                             f"({written[0]!r}); move them out of it first: they would be lost")
        before, rest = text.split(start, 1)
        text = before + block + "\n" + rest.split(end, 1)[1].lstrip("\n")
    elif start == START:
        text = block + text
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text, encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="seeds of the fast preset (default 5)")
    parser.add_argument("--seed-runs", type=int, default=3, help="seeds of the 10-epoch seed recipe (default 3)")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "data")
    parser.add_argument("--peer-runs", type=int, default=1, help="runs of the Keras peer (default 1)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the peer and the seed recipe")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    rows = [Row("Keras peer (tutorial script, TensorFlow)", note="skipped") if args.skip_peer
            else run_peer(args.data_dir, args.epochs, args.peer_runs)]
    print("peer done", flush=True)
    rows.append(run_cnnkit("cnnkit seed recipe (--model seed --val test)",
                           ["--model", "seed", "--val", "test", "--epochs", str(args.epochs)],
                           list(range(args.seed_runs)), args.data_dir,
                           "same model, optimizer, batch 32 and epochs as the tutorial"))
    rows.append(run_cnnkit("cnnkit --preset fast", ["--preset", "fast"], list(range(args.seeds)), args.data_dir,
                           "validation held out of train; test scored once"))
    cells = table_rows(rows)
    from rich.console import Console
    from rich.table import Table

    table = Table(title="MNIST on this machine: time to 99% test accuracy")
    for column in HEADER:
        table.add_column(column)
    for line in cells:
        table.add_row(*line)
    Console(width=220).print(table)
    write_results(args.output, markdown(cells, args))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""What data-parallel training costs: one MNIST epoch in 1 process vs N torchrun processes (gloo on CPU).

    python benchmarks/ddp_overhead.py [--processes 2] [--rounds 3] [--model seed] [--data-dir ../shared/data]

The question on a CPU machine is not whether N processes on the same cores are faster (they share the
cores), but how little the machinery adds: gradient all-reduce every step, sharded batches, reduced
validation. Each configuration is a real `cnnkit train` (the N-process ones through `--devices N`, which
starts torchrun's launcher), alternated round by round so drift in the machine's speed hits all alike:

- 1 process with every core (the usual run) — the peer;
- 1 process with one thread per core divided by N (what each DDP process gets);
- N processes, one thread each (OMP_NUM_THREADS as torchrun sets it).

The epoch time is the run's own (history.csv: the epoch, validation included; start-up, data loading and
the test pass excluded). Writes a table with ratios to the first row into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_speed import ROOT, SHARED, machine, run_measured, write_results  # noqa: E402

START, END = "<!-- ddp-overhead:start -->", "<!-- ddp-overhead:end -->"


def configurations(processes: int) -> list[tuple[str, list[str], dict[str, str]]]:
    cores = len(os.sched_getaffinity(0))
    per_process = max(1, cores // processes)
    return [
        (f"1 process, {cores} threads", ["--threads", str(cores)], {}),
        (f"1 process, {per_process} thread{'s' * (per_process > 1)}", ["--threads", str(per_process)], {}),
        (f"{processes} processes (DDP, gloo), {per_process} thread{'s' * (per_process > 1)} each",
         ["--devices", str(processes)], {"OMP_NUM_THREADS": str(per_process)}),
    ]


def epoch_seconds(run_dir: Path) -> float:
    with (run_dir / "history.csv").open(newline="") as handle:
        return float(next(csv.DictReader(handle))["seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="seed", help="cnnkit model (default: the tutorial's, batch 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="per process (default 32, the tutorial's)")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "data")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    configs = configurations(args.processes)
    seconds: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    accuracy: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    with tempfile.TemporaryDirectory(prefix="cnnkit-ddp-") as tmp:
        for round_ in range(args.rounds):
            for index, (name, extra, env) in enumerate(configs):
                run_name = f"r{round_}c{index}"
                command = [sys.executable, "-m", "cnnkit", "train", "--data-dir", str(args.data_dir), "--model",
                           args.model, "--batch-size", str(args.batch_size), "--epochs", "1", "--quiet",
                           "--no-checkpoint", "--runs-dir", tmp, "--name", run_name, *extra]
                output, wall, _, code = run_measured(command, env)
                if code != 0:
                    print(f"{name} failed (exit {code}):\n{output[-2000:]}", file=sys.stderr)
                    return 1
                run_dir = Path(tmp) / run_name
                seconds[name].append(epoch_seconds(run_dir))
                accuracy[name].append(json.loads((run_dir / "metrics.json").read_text())["test_accuracy"])
                print(f"round {round_ + 1}: {name}: epoch {seconds[name][-1]:.2f} s, "
                      f"test {100 * accuracy[name][-1]:.2f}%, wall {wall:.1f} s", flush=True)
    peer = statistics.median(seconds[configs[0][0]])
    lines = [f"## Data-parallel overhead: one MNIST epoch, `{args.model}` model, batch {args.batch_size} per process", "",
             f"Command: `python benchmarks/ddp_overhead.py --processes {args.processes} --rounds {args.rounds} "
             f"--model {args.model}` ({time.strftime('%Y-%m-%d %H:%M')})", f"Machine: {machine()}", "",
             "| configuration | epoch s (median) | all rounds | ratio to the first row | test acc % (mean) |",
             "|---|---|---|---|---|"]
    for name, _, _ in configs:
        median = statistics.median(seconds[name])
        lines.append(f"| {name} | {median:.2f} | {', '.join(f'{s:.2f}' for s in seconds[name])} | "
                     f"{median / peer:.2f}x | {100 * statistics.fmean(accuracy[name]):.2f} |")
    lines += ["", f"Rounds alternate the configurations. The {args.processes}-process rows step on {args.processes} x "
              f"{args.batch_size} images at a time (batch size is per process), so they take 1/{args.processes} "
              "of the steps; the issue's target is at most 1.3x the first row.", ""]
    table = "\n".join(lines)
    print("\n" + table)
    write_results(args.output, table, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

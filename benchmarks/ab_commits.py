"""Is this commit slower? Old and new code trained alternately in one run, on the same machine and data.

    python benchmarks/ab_commits.py OLD_COMMIT [--rounds 3] [--seed-epochs 3]

OLD_COMMIT is checked out into a temporary git worktree; "new" is this working tree. Each round trains,
for old then new (the order flips every round, so drift of the host's speed falls on both), the `fast`
preset and the tutorial's seed recipe (`--model seed --val test`, fewer epochs: seconds per epoch is what is
compared). Each run is a separate `python -m cnnkit train` process with PYTHONPATH pointing at that tree's
src/. Prints a table with the new/old ratio of training seconds per epoch and writes it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from mnist_speed import SHARED, machine, run_measured, write_results

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- ab_commits:start -->", "<!-- ab_commits:end -->"
RECIPES = {
    "--preset fast": ["--preset", "fast"],
    "seed recipe (--model seed --val test)": ["--model", "seed", "--val", "test"],
}


def train_once(src: Path, args: list[str], data_dir: Path, runs: Path, name: str) -> dict:
    """One `cnnkit train` of the tree at `src`; its metrics.json plus the command's wall time."""
    command = [sys.executable, "-m", "cnnkit", "train", *args, "--data-dir", str(data_dir), "--runs-dir", str(runs),
               "--name", name, "--quiet"]
    output, wall, _, code = run_measured(command, env={"PYTHONPATH": str(src)})
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code}):\n{output[-2000:]}")
    metrics = json.loads((runs / name / "metrics.json").read_text())
    return {**metrics, "wall": wall}


def which_cnnkit(src: Path) -> str:
    code = "import cnnkit, sys; print(cnnkit.__file__)"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(src)},
                          capture_output=True, text=True, check=True).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("old", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed-epochs", type=int, default=3, help="epochs of the seed recipe per run (default 3)")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "data")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed benchmark still removes its worktree

    old_rev = subprocess.run(["git", "rev-parse", "--short", args.old], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
    new_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    new_label = f"{new_rev}{' + uncommitted changes' if dirty else ''}"
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        worktree = Path(tmp) / "old"
        subprocess.run(["git", "worktree", "add", "--detach", str(worktree), args.old], cwd=ROOT, check=True,
                       capture_output=True)
        try:
            trees = {"old": worktree / "src", "new": ROOT / "src"}
            for side, src in trees.items():
                print(f"{side}: {which_cnnkit(src)}", flush=True)
            for round_index in range(args.rounds):
                order = ["old", "new"] if round_index % 2 == 0 else ["new", "old"]
                for label, recipe in RECIPES.items():
                    extra = ["--epochs", str(args.seed_epochs)] if "seed" in label else []
                    for side in order:
                        name = f"{side}-{round_index}-{len(results.get((label, side), []))}-{recipe[-1]}"
                        metrics = train_once(trees[side], recipe + extra, args.data_dir, Path(tmp) / "runs", name)
                        results.setdefault((label, side), []).append(metrics)
                        print(f"  round {round_index + 1} {label} {side}: {metrics['seconds_per_epoch']:.2f} s/epoch, "
                              f"test {metrics['test_accuracy']:.4f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT, capture_output=True)

    header = ["recipe", "runs each", f"old {old_rev} s/epoch", f"new {new_label} s/epoch", "new / old",
              "old test %", "new test %"]
    rows = []
    for label in RECIPES:
        old, new = results[(label, "old")], results[(label, "new")]
        old_s = statistics.median(m["seconds_per_epoch"] for m in old)
        new_s = statistics.median(m["seconds_per_epoch"] for m in new)
        rows.append([label, str(len(old)), f"{old_s:.3f}", f"{new_s:.3f}", f"{new_s / old_s:.3f}",
                     f"{statistics.fmean(100 * m['test_accuracy'] for m in old):.2f}",
                     f"{statistics.fmean(100 * m['test_accuracy'] for m in new):.2f}"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join([
        "## Old vs new commit, trained alternately",
        "",
        f"Command: `python benchmarks/ab_commits.py {args.old} --rounds {args.rounds} --seed-epochs {args.seed_epochs}`",
        f"Machine: {machine()}",
        "",
        *lines,
        "",
        "Medians of training seconds per epoch (validation included); new / old below 1 means the new code is faster.",
        "",
    ])
    print(table)
    write_results(args.output, table, START, END)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

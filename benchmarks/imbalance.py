"""Class imbalance: a plain run against --class-weight balanced and --sampler balanced, on the same images.

    python benchmarks/imbalance.py [--common 500] [--rare 50] [--seeds 3] [--epochs 5] [--model seed]

An MNIST folder whose digits 0-4 have `--common` training images each and 5-9 have `--rare` (10x fewer by
default), tested on all 10,000 MNIST test images (a balanced test set: ~1,000 per digit). Each recipe runs for
seeds 0..N-1 as its own `cnnkit train` process. Prints a table: balanced accuracy (the mean of the per-class
recalls), the recall of the rare classes, macro-F1 and accuracy, each mean ± std over the seeds, and the
training seconds; the last column is each recipe's balanced-accuracy error as a fraction of the plain run's
(below 1: fewer errors).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the one MNIST folder writer, shared with the tests

RECIPES = {"plain": [], "class-weight": ["--class-weight", "balanced"], "sampler": ["--sampler", "balanced"]}
RARE = [str(digit) for digit in range(5, 10)]


def run(recipe: str, seed: int, folder: Path, work: Path, common: list[str]) -> dict:
    name = f"{recipe}-{seed}"
    command = [sys.executable, "-m", "cnnkit", "train", "--dataset", f"imagefolder:{folder}", "--seed", str(seed),
               "--runs-dir", str(work / "runs"), "--name", name, "--data-dir", str(work / "data"),
               "--no-checkpoint", "--quiet", *common, *RECIPES[recipe]]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed: {done.stderr.strip()[-600:]}")
    metrics = json.loads((work / "runs" / name / "metrics.json").read_text())
    per_class = metrics["test_report"]["per_class"]
    rare_recall = statistics.fmean(per_class[digit]["recall"] for digit in RARE)
    result = {"balanced": 100 * metrics["balanced_accuracy"], "rare": 100 * rare_recall,
              "f1": 100 * metrics["macro_f1"], "accuracy": 100 * metrics["test_accuracy"],
              "train": metrics["train_seconds"], "wall": time.perf_counter() - started}
    print(f"  {name}: balanced accuracy {result['balanced']:.2f}%, rare recall {result['rare']:.2f}%, "
          f"{result['train']:.1f} s training", flush=True)
    return result


def spread(values: list[float]) -> str:
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--common", type=int, default=500, help="training images of each of digits 0-4")
    parser.add_argument("--rare", type=int, default=50, help="training images of each of digits 5-9")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--model", default="seed")
    args = parser.parse_args()
    from slices import write_mnist_folder

    common = ["--model", args.model, "--epochs", str(args.epochs), "--batch-size", "32"]
    with tempfile.TemporaryDirectory(prefix="cnnkit-imbalance-") as tmp:
        work = Path(tmp)
        counts = {digit: args.common if digit < 5 else args.rare for digit in range(10)}
        folder = write_mnist_folder(work / "mnist-imbalanced", counts)
        print(f"MNIST folder: digits 0-4 x {args.common}, 5-9 x {args.rare} training images; all 10,000 test "
              f"images; {args.model}, {args.epochs} epochs, {args.seeds} seeds", flush=True)
        results = {recipe: [run(recipe, seed, folder, work, common) for seed in range(args.seeds)]
                   for recipe in RECIPES}
    plain_error = 100 - statistics.fmean(r["balanced"] for r in results["plain"])
    print("\n| recipe | balanced accuracy % | rare-class recall % | macro-F1 % | accuracy % | train s | "
          "balanced error / plain's |")
    print("|---|---|---|---|---|---|---|")
    for recipe, runs in results.items():
        error = 100 - statistics.fmean(r["balanced"] for r in runs)
        print(f"| {recipe} | {spread([r['balanced'] for r in runs])} | {spread([r['rare'] for r in runs])} | "
              f"{spread([r['f1'] for r in runs])} | {spread([r['accuracy'] for r in runs])} | "
              f"{statistics.fmean(r['train'] for r in runs):.1f} | {error / plain_error:.2f} |")


if __name__ == "__main__":
    main()

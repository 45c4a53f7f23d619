"""A user's few photos per class: pretrained presets against training from scratch, on the same photos.

    python benchmarks/transfer_photos.py [--per-class 100] [--seeds 3] [--presets transfer-fast transfer-best]
        [--scratch cifar10-best --scratch-options "--batch-size 64 --epochs 40"] [--scratch none]
        [--cifar-jpg ../shared/data/cifar10-jpg.tar.gz]

Takes the first `--per-class` training JPEGs of each CIFAR-10 class (tests/slices.py's extraction, so the same
photos every time) and all 10,000 test JPEGs, then runs each preset and the from-scratch comparator for seeds
0..N-1, each as its own `cnnkit train` process, one at a time. Prints a table: mean ± std and minimum of test
accuracy, training seconds, whole-command seconds, and each preset's test error as a fraction of the
comparator's (below 1: fewer errors). The comparator's options are adapted to a few hundred photos
(`--scratch-options`): the CIFAR presets step on 500-2,000 images at a time, one step an epoch here.
A frozen-backbone preset (`--freeze backbone`) runs each seed with an empty feature cache, so its times include
the backbone pass over every image; one more run of its seed 0 with other head options (`--epochs 30`) then
shows the cache at work: its training seconds and whether any image went through the backbone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the one extraction of CIFAR subsets, shared with the tests


def run(preset: str, seed: int, folder: Path, work: Path, options: list[str] = (), *, cold: bool = True,
        name: str | None = None) -> dict:
    """One `cnnkit train --preset` on the photo folder: its test accuracy and timings. `cold`: with no cached
    features, as a first run on new photos would be."""
    name = name or f"{preset}-{seed}"
    if cold:
        shutil.rmtree(work / "data" / "features", ignore_errors=True)
    command = [sys.executable, "-m", "cnnkit", "train", "--preset", preset, "--dataset", f"imagefolder:{folder}",
               "--seed", str(seed), "--runs-dir", str(work / "runs"), "--name", name, "--data-dir",
               str(work / "data"), "--no-checkpoint", "--quiet", *options]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{preset} seed {seed} failed: {done.stderr.strip()[-600:]}")
    metrics = json.loads((work / "runs" / name / "metrics.json").read_text())
    features = metrics.get("frozen_features") or metrics.get("probe", {}).get("features")  # a probe's, too
    through = f", {features['computed_images']:,} images through the backbone" if features else ""
    print(f"  {name}: {100 * metrics['test_accuracy']:.2f}% in {metrics['train_seconds']:.1f} s training, "
          f"{wall:.0f} s whole{through}", flush=True)
    return {"accuracy": 100 * metrics["test_accuracy"], "train": metrics["train_seconds"], "wall": wall,
            "computed": features["computed_images"] if features else None}


def row(preset: str, runs: list[dict], scratch_error: float | None) -> str:
    accuracies = [r["accuracy"] for r in runs]
    mean = statistics.mean(accuracies)
    spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    ratio = f"{(100 - mean) / scratch_error:.2f}" if scratch_error else ("1 (comparator)" if scratch_error is None
                                                                         else "-")
    return (f"| {preset} | {len(runs)} | {mean:.2f} ± {spread:.2f} | {min(accuracies):.2f} | "
            f"{min(r['train'] for r in runs):.0f}-{max(r['train'] for r in runs):.0f} | "
            f"{min(r['wall'] for r in runs):.0f}-{max(r['wall'] for r in runs):.0f} | {ratio} |")


def main() -> None:
    from slices import CIFAR_CLASSES, add_cifar_archive_option, extract_cifar_subset

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--presets", nargs="+", default=["transfer-fast", "transfer-best"])
    parser.add_argument("--scratch", default="cifar10-best", help="the from-scratch comparator (a preset), or none")
    parser.add_argument("--scratch-options", default="--batch-size 64 --epochs 40",
                        help="options added to the comparator's command")
    add_cifar_archive_option(parser)
    args = parser.parse_args()
    comparator = [] if args.scratch == "none" else [args.scratch]
    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        folder = extract_cifar_subset(args.cifar_jpg, work / "photos", CIFAR_CLASSES,
                                      {"train": args.per_class, "test": 1000})
        scratch = args.scratch_options.split()
        results, again = {}, {}
        for preset in [*comparator, *args.presets]:
            results[preset] = [run(preset, seed, folder, work, scratch if preset == args.scratch else [])
                               for seed in range(args.seeds)]
            if preset != args.scratch and results[preset][0]["computed"] is not None:  # its cache, still there
                again[preset] = run(preset, 0, folder, work, ["--epochs", "30"], cold=False, name=f"{preset}-again")
    scratch_error = 100 - statistics.mean(r["accuracy"] for r in results[args.scratch]) if comparator else 0.0
    print(f"\nCIFAR-10 JPEGs, the first {args.per_class} training photos of each class, all 10,000 test photos\n")
    print("| preset | seeds | test acc % | min % | train s | whole command s | error / from-scratch error |")
    print("|---|---|---|---|---|---|---|")
    if comparator:
        print(row(f"{args.scratch} {args.scratch_options}", results[args.scratch], None))
    for preset in args.presets:
        print(row(preset, results[preset], scratch_error))
    for preset, second in again.items():
        print(f"\n{preset} again on the same photos (seed 0, --epochs 30): {second['train']:.1f} s training, "
              f"{second['wall']:.0f} s whole command, {second['computed']:,} images through the backbone")


if __name__ == "__main__":
    main()

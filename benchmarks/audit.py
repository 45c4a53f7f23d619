"""`cnnkit audit` at full size: flipped labels found, planted duplicates found, false pairs, time.

    python benchmarks/audit.py [--per-class 1000] [--flip 0.05] [--planted 300] [--seed 0]

Label issues: an MNIST folder of `--per-class` real training images per digit (10,000 by default) with
`--flip` of them moved to another digit's folder at random, audited with `cnnkit audit --only labels` (5
folds, 3 epochs of the default model each). Precision and recall are measured in the top-ranked share equal to
the flipped share (the top 5% for 5%).

Duplicates: CIFAR-10's 10,000 test JPEGs as they are, plus `--planted` copies of random test images of each
kind in a train/ folder: the same file, re-encoded at JPEG quality 50, saved at 64x64 (the folder loader
resizes it back to 32x32, as it does any odd-sized photo), and shifted by one pixel. Recall is the share of
planted copies paired with their original; "false pairs" are pairs of two original test images (CIFAR-10 has
a few real near-duplicates, so this is an upper bound on the false ones).
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def audit(target: Path, out: Path, data: Path, *options: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "cnnkit", "audit", f"imagefolder:{target}", "--out", str(out),
                           "--data-dir", str(data), *options], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"audit failed: {done.stderr.strip()[-800:]}")
    return time.perf_counter() - started, done.stdout


def rows(path: Path) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(path.read_text())))


def label_issues(work: Path, per_class: int, flip: float, seed: int) -> None:
    from slices import write_mnist_folder

    folder = write_mnist_folder(work / "mnist", {digit: per_class for digit in range(10)}, test_per_class=10,
                                flip=flip, seed=seed)
    flipped = len(list(folder.glob("train/*/flipped-*")))
    seconds, _ = audit(folder, work / "labels", work / "data", "--only", "labels", "--seed", str(seed))
    issues = rows(work / "labels" / "label_issues.csv")
    top = issues[:flipped]
    hits = sum(Path(issue["file"]).name.startswith("flipped-") for issue in top)
    everywhere = sum(Path(issue["file"]).name.startswith("flipped-") for issue in issues)
    print(f"\n| label issues: {10 * per_class:,} MNIST images, {flipped} flipped | value |\n|---|---|")
    print(f"| precision = recall in the top {flipped} ({100 * flipped / (10 * per_class):.0f}%) | "
          f"{100 * hits / flipped:.1f}% |")
    print(f"| flagged by confident learning | {len(issues)} (of which flipped: {everywhere}, recall "
          f"{100 * everywhere / flipped:.1f}%) |")
    print(f"| whole command | {seconds:.0f} s |", flush=True)


def planted_copies(work: Path, planted: int, seed: int) -> None:
    from slices import CIFAR_CLASSES, SHARED_DATA, extract_cifar_subset

    folder = extract_cifar_subset(SHARED_DATA / "cifar10-jpg.tar.gz", work / "cifar", CIFAR_CLASSES, {"test": 1000})
    originals = sorted(folder.glob("test/*/*.jpg"))
    rng = np.random.default_rng(seed)
    kinds = {"same file": None, "JPEG q50": lambda image: image,
             "64x64": lambda image: image.resize((64, 64), Image.BILINEAR),
             "1-px shift": lambda image: Image.fromarray(np.concatenate(
                 [np.asarray(image)[:, :1], np.asarray(image)[:, :-1]], axis=1))}
    made: dict[str, list[tuple[str, str]]] = {}
    for kind, change in kinds.items():
        made[kind] = []
        for index in rng.choice(len(originals), planted, replace=False):
            source = originals[index]
            label = source.parent.name
            name = f"{kind.replace(' ', '_').replace('-', '')}-{source.stem}.jpg"
            target = folder / "train" / label / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if kind == "same file":
                target.write_bytes(source.read_bytes())
            else:
                change(Image.open(source).convert("RGB")).save(target, "JPEG",
                                                               quality=50 if kind == "JPEG q50" else 95)
            made[kind].append((f"train/{label}/{name}", f"test/{label}/{source.name}"))
    seconds, _ = audit(folder, work / "dups", work / "data", "--only", "duplicates")
    pairs = {frozenset((pair["file_a"], pair["file_b"])) for pair in rows(work / "dups" / "duplicates.csv")}
    between = [pair for pair in pairs if all(name.startswith("test/") for name in pair)]
    involved = {name for pair in between for name in pair}
    print(f"\n| duplicates: CIFAR-10 test (10,000 JPEGs) + {planted} planted copies of each kind | value |\n|---|---|")
    for kind, copies in made.items():
        found = sum(frozenset(copy) in pairs for copy in copies)
        print(f"| recall, {kind} | {100 * found / len(copies):.1f}% ({found}/{len(copies)}) |")
    print(f"| pairs of two original test images | {len(between)} ({100 * len(involved) / len(originals):.2f}% of "
          f"the images in one) |")
    print(f"| whole command ({len(originals) + len(kinds) * planted:,} images) | {seconds:.0f} s |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=1000)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--planted", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cnnkit-audit-") as tmp:
        label_issues(Path(tmp), args.per_class, args.flip, args.seed)
        planted_copies(Path(tmp), args.planted, args.seed)


if __name__ == "__main__":
    main()

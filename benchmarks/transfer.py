"""Transfer learning on CIFAR-10: pretrain on 5 classes, fine-tune on the other 5 with 100 images per class.

The real experiment behind `cnnkit train --init RUN`. From the JPEG copy of CIFAR-10
(../shared/data/cifar10-jpg.tar.gz, streamed into a temporary folder):
- A: airplane, automobile, bird, cat, deer: `--per-class-a` training images per class (default 1000) and
  their 1,000 test images each;
- B: dog, frog, horse, ship, truck: `--per-class-b` training images per class (default 100) and their
  1,000 test images each.
A model is pretrained on A; then B is trained with the same recipe and epochs three ways: from scratch,
fine-tuned from A (`--init`, a new head), and fine-tuned with the head trained alone first and a slower
backbone (`--freeze-epochs`, `--backbone-lr-scale`). Every B row is the mean over `--seeds` seeds. Training
validates on the test split (`--val test`) only to draw curves: every run keeps its last epoch, nothing is
chosen by the test set. Prints a table and writes it, with the machine, to benchmarks/RESULTS.md.

    python benchmarks/transfer.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the one extraction of CIFAR subsets, shared with the tests

from mnist_speed import machine, write_results  # noqa: E402
from slices import CIFAR_CLASSES  # noqa: E402

ARCHIVE = HERE.parent.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CLASSES_A, CLASSES_B = CIFAR_CLASSES[:5], CIFAR_CLASSES[5:]
START, END = "<!-- transfer:start -->", "<!-- transfer:end -->"

#: One recipe for every run: the `fast` CNN widened for colour photos, AdamW with a one-cycle schedule,
#: label smoothing, random crops and flips (flip is on for colour folders by default).
RECIPE = {
    "model": "fast",
    "model_kwargs": {"widths": [32, 64, 128], "first_kernel": 3},
    "optimizer": "adamw",
    "lr": 3e-3,
    "weight_decay": 5e-4,
    "schedule": "onecycle",
    "warmup": 0.2,
    "label_smoothing": 0.1,
    "augment": "crop=4",
    "batch_size": 64,
    "val": "test",
    "keep": "last",
}


def extract(archive: Path, root: Path, per_class: dict[str, int]) -> dict[str, Path]:
    """root/A and root/B, each with train/<class>/ and test/<class>/ folders: the first `per_class[group]`
    training JPEGs of each class and all 1,000 of its test JPEGs (tests/slices.py's extraction)."""
    from slices import extract_cifar_subset

    return {group: extract_cifar_subset(archive, root / group, classes, {"train": per_class[group], "test": 1000})
            for group, classes in (("A", CLASSES_A), ("B", CLASSES_B))}


@dataclass
class Row:
    name: str
    what: str
    accuracies: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    curves: list[list[float]] = field(default_factory=list)

    def cells(self, baseline: Row | None) -> list[str]:
        mean = statistics.mean(self.accuracies)
        spread = f" ± {statistics.stdev(self.accuracies) * 100:.2f}" if len(self.accuracies) > 1 else ""
        gain = "—"
        if baseline is not None and baseline is not self:
            gain = f"{(mean - statistics.mean(baseline.accuracies)) * 100:+.2f}"
        at = [statistics.mean(curve[i] for curve in self.curves) for i in checkpoints(len(self.curves[0]))]
        return [self.name, self.what, str(len(self.accuracies)), f"{mean * 100:.2f}{spread}",
                f"{min(self.accuracies) * 100:.2f}", gain, " / ".join(f"{a * 100:.1f}" for a in at),
                f"{statistics.mean(self.seconds):.1f}"]


def checkpoints(epochs: int) -> list[int]:
    """Epoch indices where the table shows the test curve: the first, a quarter, half, and the last."""
    return sorted({0, epochs // 4, epochs // 2, epochs - 1})


def train(data: Path, cache: Path, runs: Path, name: str, threads: int, **options) -> tuple[float, float, list[float]]:
    import cnnkit

    result = cnnkit.train(dataset=f"imagefolder:{data}", data_dir=str(cache), runs_dir=str(runs), name=name,
                          threads=threads, progress=False, log=lambda *_: None, **{**RECIPE, **options})
    metrics = result.metrics
    print(f"  {name}: test accuracy {metrics['test_accuracy']:.4f}, {metrics['train_seconds']:.1f} s", flush=True)
    return metrics["test_accuracy"], metrics["train_seconds"], list(result.history.history["val_accuracy"])


def run(args: argparse.Namespace, work: Path) -> tuple[Row, list[Row]]:
    started = time.perf_counter()
    folders = extract(args.archive, work / "data", {"A": args.per_class_a, "B": args.per_class_b})
    print(f"extracted A and B to {work / 'data'} in {time.perf_counter() - started:.1f} s", flush=True)
    cache, runs = work / "cache", work / "runs"
    accuracy, seconds, curve = train(folders["A"], cache, runs, "pretrain-A", args.threads,
                                     epochs=args.pretrain_epochs, seed=0)
    pretrained = Row("pretrain on A", f"{len(CLASSES_A)} classes x {args.per_class_a}, {args.pretrain_epochs} epochs",
                     [accuracy], [seconds], [curve])
    init = str(runs / "pretrain-A")
    variants = [
        ("B from scratch", "random init", {}),
        ("B fine-tuned", "--init A (new head)", {"init": init}),
        ("B fine-tuned, head first", f"--init A --freeze-epochs {args.freeze_epochs} --backbone-lr-scale "
                                     f"{args.backbone_lr_scale}",
         {"init": init, "freeze_epochs": args.freeze_epochs, "backbone_lr_scale": args.backbone_lr_scale}),
    ]
    rows = [Row(name, what) for name, what, _ in variants]
    for seed in range(args.seeds):
        for row, (_, _, options) in zip(rows, variants):
            accuracy, seconds, curve = train(folders["B"], cache, runs, f"{row.name}-{seed}".replace(" ", "-").replace(
                ",", ""), args.threads, epochs=args.epochs, seed=seed, batch_size=args.batch_b, **options)
            row.accuracies.append(accuracy)
            row.seconds.append(seconds)
            row.curves.append(curve)
    return pretrained, rows


HEADER = ["row", "how", "seeds", "test acc % mean ± std", "min %", "vs scratch (points)",
          "test acc % at epochs 1 / ¼ / ½ / last", "train s"]


def markdown(table: list[list[str]], args: argparse.Namespace, total: float) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    recipe = ", ".join(f"{key}={value}" for key, value in RECIPE.items() if key != "batch_size")
    return "\n".join([
        "# Transfer: pretrain on 5 CIFAR-10 classes, fine-tune on the other 5 with 100 images each",
        "",
        f"Command: `python benchmarks/transfer.py --threads {args.threads} --seeds {args.seeds} --epochs {args.epochs} "
        f"--pretrain-epochs {args.pretrain_epochs}` ({time.strftime('%Y-%m-%d')}; {total / 60:.1f} min in all)",
        f"Machine: {machine()}",
        "",
        *lines,
        "",
        f"A = {', '.join(CLASSES_A)} ({args.per_class_a} training JPEGs each); B = {', '.join(CLASSES_B)} "
        f"({args.per_class_b} each, {len(CLASSES_B) * args.per_class_b} in all). Test sets: the 1,000 test JPEGs "
        f"of each class. One recipe for all: {recipe}; batch {RECIPE['batch_size']} on A, {args.batch_b} on B, and "
        f"{args.epochs} epochs for every B run. Accuracy is on B's 5,000 test images (5 classes: chance is 20%); "
        "each run keeps its last epoch.",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, default=ARCHIVE, help="the CIFAR-10 JPEG archive")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each training (default 2)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of each B variant (default 2)")
    parser.add_argument("--per-class-a", type=int, default=1000, help="training images per A class (default 1000)")
    parser.add_argument("--per-class-b", type=int, default=100, help="training images per B class (default 100)")
    parser.add_argument("--pretrain-epochs", type=int, default=15, help="epochs on A (default 15)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs of every B run (default 30)")
    parser.add_argument("--batch-b", type=int, default=50, help="batch size of the B runs (default 50)")
    parser.add_argument("--freeze-epochs", type=int, default=3, help="head-only epochs of the last row (default 3)")
    parser.add_argument("--backbone-lr-scale", type=float, default=0.3, help="backbone rate of the last row")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md", help="file to write the table into")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if not args.archive.is_file():
        print(f"transfer.py: {args.archive} not found (the CIFAR-10 JPEG archive)", file=sys.stderr)
        return 1
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cnnkit-transfer-") as work:
        pretrained, rows = run(args, Path(work))
    total = time.perf_counter() - started
    table = [pretrained.cells(None), *(row.cells(rows[0]) for row in rows)]
    from rich.console import Console
    from rich.table import Table

    shown = Table(title="Transfer on CIFAR-10 JPEGs: B = 5 classes x 100 training images")
    for column in HEADER:
        shown.add_column(column, justify="left" if column in ("row", "how") else "right")
    for cells in table:
        shown.add_row(*cells)
    Console(width=200).print(shown)
    print(f"{total:.0f} s in all")
    if not args.no_write:
        write_results(args.results, markdown(table, args, total) + "\n", START, END)
        print(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Memory of one training epoch on an image folder: loaded into memory vs streamed from disk, at two sizes.

    python benchmarks/stream_memory.py [--sizes 1,3] [--side 128] [--work DIR]

For each size (GB of decoded images) a folder of SIDExSIDE JPEGs is generated (a few distinct images per
class, hard-linked many times: the files cost no disk, every one is still decoded), decoded once into
cnnkit's cache by its own measured process, then trained for one epoch by `cnnkit train` with
`--stream no` and with `--stream yes` (a tiny FILE.py:FUNCTION model, so the data path is what is
measured). Peak RSS is each process's ru_maxrss (os.wait4); the epoch time is the run's own (history.csv:
the epoch with its validation pass). Streaming's claim: its peak does not grow with the dataset, while the
in-memory peak is about twice the decoded size. Writes the table into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_speed import ROOT, machine, run_measured, write_results  # noqa: E402

START, END = "<!-- stream-memory:start -->", "<!-- stream-memory:end -->"
CLASSES = 4
DISTINCT = 16  # distinct images per class; the rest are hard links to them

#: A model whose cost is negligible next to reading the data: average-pool to 16x16, one linear layer.
TINY_MODEL = '''
import torch.nn as nn


def build(input_shape, num_classes):
    channels, height, width = input_shape
    return nn.Sequential(nn.AdaptiveAvgPool2d(16), nn.Flatten(), nn.Linear(channels * 256, num_classes))
'''


def make_folder(root: Path, count: int, side: int, seed: int = 0, suffix: str = ".jpg") -> Path:
    """`root/<class>/<n>.jpg`: `count` side x side colour JPEGs in CLASSES classes (a flat folder: cnnkit holds
    out 10 % per class as test), DISTINCT different ones per class, each class its own tint. `suffix` ".bmp"
    makes uncompressed files, decoded ~3x faster (the memory test's choice)."""
    rng = np.random.default_rng(seed)
    for label in range(CLASSES):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        originals = []
        for index in range(DISTINCT):
            coarse = rng.integers(0, 256, (8, 8, 3)).astype(np.float32)
            coarse[..., label % 3] = coarse[..., label % 3] * 0.5 + 127  # the class's tint
            image = np.asarray(_resized(coarse.astype(np.uint8), side))
            path = folder / f"{index}{suffix}"
            _save(image, path)
            originals.append(path)
        for index in range(DISTINCT, count // CLASSES):
            os.link(originals[index % DISTINCT], folder / f"{index}{suffix}")
    return root


def _resized(image: np.ndarray, side: int):
    from PIL import Image

    return Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)


def _save(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(image).save(path, **({"quality": 90} if path.suffix == ".jpg" else {}))


def decode_command(folder: Path, cache: Path) -> list[str]:
    """Decode the folder into the cache (what the first `cnnkit train` on a folder does first)."""
    code = ("import sys; from cnnkit.data.folder import load_image_folder; "
            "load_image_folder(sys.argv[1], sys.argv[2], on_disk=True)")
    return [sys.executable, "-c", code, str(folder), str(cache)]


def train_command(folder: Path, cache: Path, model: Path, runs: Path, name: str, stream: str,
                  batch_size: int) -> list[str]:
    return [sys.executable, "-m", "cnnkit", "train", "--dataset", f"imagefolder:{folder}", "--data-dir", str(cache),
            "--model", f"{model}:build", "--epochs", "1", "--batch-size", str(batch_size), "--eval-batch-size", "250",
            "--stream", stream, "--no-checkpoint", "--quiet", "--runs-dir", str(runs), "--name", name]


def epoch_seconds(run_dir: Path) -> float:
    with (run_dir / "history.csv").open(newline="") as handle:
        return float(next(csv.DictReader(handle))["seconds"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1,3", help="decoded sizes in GB, comma-separated (default 1,3)")
    parser.add_argument("--side", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--work", type=Path, default=None, help="folder for the images and cache (default: a temp dir)")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()
    sizes = [float(size) for size in args.sizes.split(",")]
    item = 3 * args.side * args.side
    work = Path(tempfile.mkdtemp(prefix="cnnkit-stream-", dir=args.work))
    rows = []
    try:
        model = work / "tiny.py"
        model.write_text(TINY_MODEL)
        for size in sizes:
            count = int(size * 1e9 / item) // CLASSES * CLASSES
            folder, cache, runs = work / f"images-{size:g}GB", work / f"cache-{size:g}GB", work / "runs"
            make_folder(folder, count, args.side)
            output, wall, rss, code = run_measured(decode_command(folder, cache))
            if code != 0:
                print(output[-3000:], file=sys.stderr)
                return 1
            rows.append((size, count, "decode into the cache", rss, None, wall))
            print(f"{size:g} GB ({count:,} images): decoded in {wall:.1f} s, peak RSS {rss:.0f} MiB", flush=True)
            for stream in ("no", "yes"):
                name = f"{size:g}GB-{stream}"
                output, wall, rss, code = run_measured(
                    train_command(folder, cache, model, runs, name, stream, args.batch_size))
                if code != 0:
                    print(output[-3000:], file=sys.stderr)
                    return 1
                mode = "in memory (--stream no)" if stream == "no" else "streamed (--stream yes)"
                rows.append((size, count, mode, rss, epoch_seconds(runs / name), wall))
                print(f"  {mode}: peak RSS {rss:.0f} MiB, epoch {rows[-1][4]:.1f} s, wall {wall:.1f} s", flush=True)
            shutil.rmtree(cache)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["## Image folders larger than memory: peak RSS of one epoch, in memory vs streamed", "",
             f"Command: `python benchmarks/stream_memory.py --sizes {args.sizes} --side {args.side}` "
             f"({time.strftime('%Y-%m-%d %H:%M')})", f"Machine: {machine()}", "",
             f"{args.side}x{args.side} RGB JPEGs ({item:,} bytes decoded each), a tiny model "
             f"(average-pool + linear), batch {args.batch_size}, one epoch plus validation and the test pass; "
             "each row is its own process.", "",
             "| decoded | images | process | peak RSS MiB | RSS / decoded size | epoch s | wall s |",
             "|---|---|---|---|---|---|---|"]
    for size, count, mode, rss, epoch, wall in rows:
        lines.append(f"| {size:g} GB | {count:,} | {mode} | {rss:,.0f} | {rss * 2**20 / (count * item):.2f} | "
                     f"{'' if epoch is None else f'{epoch:.1f}'} | {wall:.1f} |")
    lines += ["", "Streaming keeps a window of 32 chunks of 4 MiB (128 MiB) plus a batch of the decoded images in "
              "memory (src/cnnkit/data/disk.py). The in-memory path holds the splits, fit()'s channels_last copy "
              "of train and validation, and channel_stats' float32 copy of up to 10,000 training images (1.9 GB "
              "of it at this image size: most of the 1 GB row's peak).", ""]
    table = "\n".join(lines)
    print("\n" + table)
    write_results(args.output, table, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

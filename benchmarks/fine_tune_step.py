"""Seconds per fine-tuning step of a pretrained backbone, by input resolution and --freeze-stages, on the CPU.

    python benchmarks/fine_tune_step.py [--model efficientnet_lite2] [--sizes 160 192 224] [--stages 0 2 3 4]
                                        [--steps 6] [--rounds 3] [--no-write]

A step is what `cnnkit train --preset transfer-best` runs per batch: 32 CIFAR-10-sized uint8 photos (32 px,
resized inside the network), forward, label-smoothed cross-entropy, backward, AdamW; channels-last, every
BatchNorm in eval mode (--freeze-bn), the first N stages kept as engine.fit keeps them (`stages_kept`, eval
mode). The configurations run in interleaved rounds (each one `--steps` timed steps after one warm-up step), so a
shared host's drift falls on all of them; each figure is the median over the rounds. The peer is the preset's own
configuration (160 px, no stage kept), measured in the same run: the ratio column is against it.
Writes the table, with the machine it ran on, to benchmarks/RESULTS.md between the fine_tune_step markers.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_speed import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- fine_tune_step:start -->", "<!-- fine_tune_step:end -->"
PEER = (160, 0)  # transfer-best's resolution, nothing kept


def step_timer(model_name: str, size: int, stages: int, held: contextlib.ExitStack, batch: int = 32):
    """A function that runs one fine-tuning step and returns its seconds, for this configuration."""
    from cnnkit.engine.fit import keep_batchnorm_statistics, stages_kept
    from cnnkit.engine.optim import make_optimizer
    from cnnkit.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, (3, 32, 32), 10, mean=[127.5] * 3, std=[127.5] * 3, seed=0,
                        resolution=size, drop_path_rate=0.2).to(memory_format=torch.channels_last)
    fixed = held.enter_context(stages_kept(model, stages))  # as fit() holds it for a run's life
    model.train()  # the modes fit() sets at each epoch's start, set once: nothing here changes them
    for stage in fixed:
        stage.eval()
    keep_batchnorm_statistics(model)
    optimizer = make_optimizer(model, "adamw", 2.5e-4, 0.05)
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))

    def step() -> float:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels, label_smoothing=0.1).backward()
        optimizer.step()
        return time.perf_counter() - started

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_lite2")
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()
    configs = sorted({PEER, *((size, stages) for size in args.sizes for stages in args.stages)})
    held = contextlib.ExitStack()
    timers = {config: step_timer(args.model, *config, held) for config in configs}
    for step in timers.values():
        step()  # warm-up: oneDNN picks its kernels for each shape once
    seconds: dict[tuple[int, int], list[float]] = {config: [] for config in configs}
    for _ in range(args.rounds):
        for config, step in timers.items():
            seconds[config].append(statistics.mean(step() for _ in range(args.steps)))
    peer = statistics.median(seconds[PEER])
    rows = ["| px | --freeze-stages | s / step | vs 160 px, none kept | spread over rounds |", "|---|---|---|---|---|"]
    for (size, stages), times in seconds.items():
        median = statistics.median(times)
        rows.append(f"| {size} | {stages} | {median:.3f} | {median / peer:.2f}x | {min(times):.3f}-{max(times):.3f} |")
    table = "\n".join([
        f"## Fine-tuning step time by resolution and kept stages ({args.model})", "",
        f"Command: `python benchmarks/fine_tune_step.py --model {args.model} --sizes {' '.join(map(str, args.sizes))} "
        f"--stages {' '.join(map(str, args.stages))} --steps {args.steps} --rounds {args.rounds}`", "",
        f"Machine: {machine()}", "", *rows, ""])
    print(table)
    if not args.no_write:
        write_results(ROOT / "benchmarks" / "RESULTS.md", table, START, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

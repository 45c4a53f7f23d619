"""Offline inference throughput of a trained run: PyTorch eager vs ONNX Runtime vs TorchScript, on the CPU.

    python benchmarks/inference_speed.py RUN [RUN ...] [--threads N [N ...]] [--seconds 6] [--rounds 5] [--no-write]

Each RUN is exported with cnnkit.export (into a temporary folder, the parity check included) and the three
engines run the same thing: uint8 images in, softmax probabilities out (scaling inside), at batch 1 and
batch 256, all with the same number of intra-op threads (PyTorch's default, one per core, or each of
--threads in turn) and one inter-op thread. Engines are measured in interleaved rounds (eager, ONNX Runtime,
TorchScript, eager, ...) so a shared host's drift falls on all of them; each figure is the median over
the rounds of images per second. Prints a table with ratios against eager and writes it, with the machine
it ran on, to benchmarks/RESULTS.md between the inference_speed markers.

The target checked: ONNX Runtime's throughput at batch 1 at least PyTorch eager's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_speed import machine, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- inference_speed:start -->", "<!-- inference_speed:end -->"
BATCHES = (1, 256)
ENGINES = ("PyTorch eager", "ONNX Runtime", "TorchScript")
HEADER = ["model", "threads", "batch", "engine", "images/s", "ms / batch", "vs eager", "spread"]


@dataclass
class Cell:
    model: str
    threads: int
    batch: int
    engine: str
    rates: list[float] = field(default_factory=list)  # images/s, one per round

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


def export_both(run, folder: Path) -> tuple[dict, list[str]]:
    """Export `run` as ONNX and TorchScript into `folder`: {format: ExportResult} and their parity lines."""
    from cnnkit.export import export_run

    results = {fmt: export_run(run, fmt, out=folder / name, parity_images=256)
               for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.torchscript.pt"))}
    notes = [f"{run.path.name} {r.format}: max |diff| {r.max_abs_diff:.1e}, top-1 agreement {r.top1_agreement:.0%} "
             f"on {r.images} {r.data}; export {r.seconds:.1f}s" for r in results.values()]
    return results, notes


def engines_for(run, exports: dict, threads: int) -> dict[str, Callable]:
    """name -> function(uint8 numpy batch) for the three engines, each on `threads` intra-op threads."""
    import onnxruntime
    import torch

    from cnnkit.export import ExportModule

    torch.set_num_threads(threads)
    eager_model = ExportModule(run.model, run.input_shape).eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = onnxruntime.InferenceSession(str(exports["onnx"].path), options, providers=["CPUExecutionProvider"])
    scripted = torch.jit.load(str(exports["torchscript"].path), map_location="cpu").eval()

    def eager(batch):
        with torch.inference_mode():
            return eager_model(torch.from_numpy(batch)).numpy()

    def ort(batch):
        return session.run(["probabilities"], {"images": batch})[0]

    def torchscript(batch):
        with torch.inference_mode():
            return scripted(torch.from_numpy(batch)).numpy()

    return dict(zip(ENGINES, (eager, ort, torchscript)))


def images_per_second(function: Callable, batch, seconds: float) -> float:
    """Call `function(batch)` for about `seconds`; images per second."""
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        function(batch)
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return calls * len(batch) / (now - start)


def measure(run_dir: Path, thread_counts: list[int], seconds: float, rounds: int) -> tuple[list[Cell], list[str], str]:
    from cnnkit.export import parity_data
    from cnnkit.runs import load_run

    run = load_run(run_dir)
    name = f"{run_dir.name} ({run.meta.architecture})"
    images, data = parity_data(run, max(BATCHES))
    cells = []
    with tempfile.TemporaryDirectory() as tmp:
        exports, notes = export_both(run, Path(tmp))
        for threads in thread_counts:
            engines = engines_for(run, exports, threads)
            found = {(batch, engine): Cell(name, threads, batch, engine) for batch in BATCHES for engine in ENGINES}
            for batch_size in BATCHES:
                batch = images[:batch_size].numpy().copy()
                for function in engines.values():  # warm up (TorchScript's profiling executor optimises here)
                    images_per_second(function, batch, 0.3)
                for _ in range(rounds):
                    for engine, function in engines.items():
                        found[batch_size, engine].rates.append(images_per_second(function, batch, seconds / rounds))
            cells += found.values()
    return cells, notes, data


def rows(cells: list[Cell]) -> list[list[str]]:
    eager = {(c.model, c.threads, c.batch): c.rate for c in cells if c.engine == ENGINES[0]}
    lines = []
    for c in cells:
        spread = f"{min(c.rates):,.0f}-{max(c.rates):,.0f}"
        ratio = c.rate / eager[c.model, c.threads, c.batch]
        lines.append([c.model, str(c.threads), str(c.batch), c.engine, f"{c.rate:,.0f}",
                      f"{1000 * c.batch / c.rate:.3f}", f"{ratio:.2f}x", spread])
    return lines


def verdicts(cells: list[Cell]) -> list[str]:
    found = []
    for model, threads in dict.fromkeys((c.model, c.threads) for c in cells):
        rate = {c.engine: c.rate for c in cells if (c.model, c.threads, c.batch) == (model, threads, 1)}
        ratio = rate["ONNX Runtime"] / rate["PyTorch eager"]
        met = "met" if ratio >= 1 else "NOT met"
        plural = "s" * (threads > 1)
        found.append(f"{model}, {threads} thread{plural}: ONNX Runtime at batch 1 is {ratio:.2f}x PyTorch eager "
                     f"({rate['ONNX Runtime']:,.0f} vs {rate['PyTorch eager']:,.0f} images/s): target {met}")
    return found


def load_note(load: tuple[float, float]) -> list[str]:
    """What the host's load average (at start, at end) means for the figures; nothing on a quiet host."""
    cores = os.cpu_count() or 1
    if max(load) <= cores:
        return [f"Load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, on {cores} cores.", ""]
    return [f"The host was busy: load average {load[0]:.1f} at the start, {load[1]:.1f} at the end, on {cores} cores "
            "(other processes held the cores). PyTorch's OpenMP threads wait for each other at every operator, so "
            "when one of them is descheduled every operator stalls: that is what rows of more than one thread show "
            "for PyTorch eager and TorchScript here; ONNX Runtime's own thread pool suffers far less. The "
            "one-thread rows are the fairer comparison on such a host.", ""]


def markdown(table: list[list[str]], notes: list[str], found: list[str], args, data: str,
             load: tuple[float, float]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    runs = " ".join(str(path) for path in args.runs)
    threads = " ".join(str(n) for n in args.threads)
    return "\n".join([
        "## Inference speed: PyTorch eager vs ONNX Runtime vs TorchScript",
        "",
        f"Command: `python benchmarks/inference_speed.py {runs} --threads {threads} --seconds {args.seconds:g} "
        f"--rounds {args.rounds}` ({time.strftime('%Y-%m-%d')})",
        f"Machine: {machine()}",
        "",
        *lines,
        "",
        f"Offline throughput on {data}, uint8 images in, softmax probabilities out (the exported graph's "
        f"whole job) on the CPU, every engine on the row's number of intra-op threads (one inter-op thread). "
        f"images/s: median of {args.rounds} interleaved rounds (spread: their range); vs eager: the row's "
        "images/s over PyTorch eager's at the same threads and batch.",
        "",
        *load_note(load),
        "Target, ONNX Runtime at least as fast as PyTorch eager at batch 1:",
        "",
        *[f"- {line}" for line in found],
        "",
        "Exports (parity with PyTorch eager, checked on export):",
        "",
        *[f"- {line}" for line in notes],
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", metavar="RUN", nargs="+", type=Path, help="run directories")
    parser.add_argument("--threads", type=int, nargs="+", metavar="N",
                        help="intra-op threads of every engine; several values measure each (default: torch's, "
                             "one per core)")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed seconds per engine and batch (default 6)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds those seconds are split into")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args()

    import torch

    from cnnkit.errors import CnnkitError

    torch.set_num_interop_threads(1)
    args.threads = args.threads or [torch.get_num_threads()]
    cells, notes, data = [], [], ""
    load_at_start = os.getloadavg()[0]
    try:
        for run_dir in args.runs:
            found_cells, found_notes, data = measure(run_dir, args.threads, args.seconds, args.rounds)
            cells += found_cells
            notes += found_notes
    except CnnkitError as error:
        print(f"inference_speed: error: {error}", file=sys.stderr)
        return 1
    table, found = rows(cells), verdicts(cells)
    load = (load_at_start, os.getloadavg()[0])

    from rich.console import Console
    from rich.table import Table

    shown = Table(title="Inference throughput on the CPU (uint8 images in, probabilities out)")
    for column in HEADER:
        shown.add_column(column, justify="left" if column in ("model", "engine") else "right")
    for line in table:
        shown.add_row(*line)
    console = Console(width=160)
    console.print(shown)
    for line in found + notes + load_note(load)[:1]:
        print(line)
    if not args.no_write:
        write_results(args.output, markdown(table, notes, found, args, data, load), START, END)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

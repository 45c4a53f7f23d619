"""What a heatmap costs: explaining one image (Grad-CAM) against predicting it, on this CPU.

    python benchmarks/explain_speed.py [--repeats 200] [--models seed resnet18]

For each model, one image at a time (as the server and `predict --explain` see them): the median time of a
plain prediction (cnnkit.predict), of cnnkit.explain for the predicted class given (what `predict --explain`
does: the prediction is already made), and of cnnkit.explain choosing the class itself (read off the same
forward pass). Weights are random: the cost does not depend on them. The ratio is the issue's measure (target <= 2x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import cnnkit

SHAPES = {"seed": (1, 28, 28), "fast": (1, 28, 28), "airbench": (3, 32, 32), "resnet18": (3, 224, 224),
          "efficientnet_lite0": (3, 224, 224)}


def median_ms(call, repeats: int) -> float:
    call()  # warm up: first-call allocations and finding the layer
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--models", nargs="+", default=["seed", "airbench", "resnet18"])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | input | predict ms | explain ms (class given) | ratio | explain ms (class chosen) | ratio |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        shape = SHAPES[name]
        model = cnnkit.build_model(name, shape, 10, mean=[0.5] * shape[0], std=[0.25] * shape[0]).eval()
        image = np.random.default_rng(0).integers(0, 256, (1, *shape), dtype=np.uint8)
        target = int(cnnkit.predict(model, image).argmax())
        repeats = args.repeats if shape[-1] < 100 else max(10, args.repeats // 10)
        predicted = median_ms(lambda: cnnkit.predict(model, image), repeats)
        given = median_ms(lambda: cnnkit.explain(model, image, target), repeats)
        chosen = median_ms(lambda: cnnkit.explain(model, image), repeats)
        print(f"| {name} | {'x'.join(map(str, shape))} | {predicted:.2f} | {given:.2f} | {given / predicted:.2f} | "
              f"{chosen:.2f} | {chosen / predicted:.2f} |", flush=True)


if __name__ == "__main__":
    main()

"""Stage 5, test: the one evaluation on the test set, and what it cannot vouch for (a NaN loss, a test split
too small to say much)."""

from __future__ import annotations

import math

import torch

from cnnkit.config import TrainConfig
from cnnkit.data.tensors import Dataset
from cnnkit.errors import TrainingDiverged
from cnnkit.engine.evaluate import EvalReport, evaluate
from cnnkit.engine.distributed import World
from cnnkit.models.tta import with_tta
from cnnkit.stages.data import warn


#: A test accuracy known to worse than +-5 points (95% interval) says little: said after the run.
WIDE_INTERVAL = 0.05


def small_test_warning(report: EvalReport) -> str | None:
    low, high = report.accuracy_ci95
    if (high - low) / 2 <= WIDE_INTERVAL:
        return None
    total = int(report.confusion.sum())
    return (f"only {total:,} test images: the test accuracy {100 * report.accuracy:.1f}% is known only to "
            f"{100 * low:.0f}-{100 * high:.0f}% (95% interval); more test images narrow it")


def check_finite_result(report: EvalReport) -> None:
    """A test loss that is NaN or infinite is no result to record (weights that overflow on test images)."""
    if not math.isfinite(report.loss):
        raise TrainingDiverged(f"the test loss is {report.loss}: the trained weights overflow on the test images; "
                               "lower the learning rate (--lr), or train in fp32 (--precision fp32)")


def score_test_set(config: TrainConfig, model: torch.nn.Module, data: Dataset, classes: list[str],
                   device: torch.device, world: World) -> EvalReport:
    """The one evaluation on the test set (with the run's test-time augmentation; each process scores its share);
    on rank 0, refused when not finite and a warning when too small to say much."""
    report = evaluate(with_tta(model, config.tta), data.test.to(device), classes, batch_size=config.eval_batch_size,
                      world=world)
    if world.is_main:
        check_finite_result(report)
        if warning := small_test_warning(report):
            warn(warning)
    return report

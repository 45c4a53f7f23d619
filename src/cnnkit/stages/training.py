"""Stage 4, fit: what trains on what. The whole model on the images, or, with --freeze backbone, its head on
the backbone's cached features (engine/features.py); with --probe-epochs, the head on those features first and
then the whole model (LP-FT)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from cnnkit.config import TrainConfig
from cnnkit.data.tensors import Dataset
from cnnkit.errors import CnnkitError
from cnnkit.engine.distributed import World
from cnnkit.engine.features import LINEAR_PROBE, FeatureSummary, features_folder, frozen_features
from cnnkit.engine.callbacks import History
from cnnkit.engine.fit import check_sampler, fit

#: The probe's head recipe is transfer-fast's (presets/transfer-fast.toml), which 5-fold cross-validation chose
#: for a new head on EfficientNet-Lite2's features: AdamW at 1e-3, weight decay 0.05, a cosine decay, batches of
#: 32, no label smoothing. Only its length is an option (--probe-epochs); the rest is the fine-tuning's business.
PROBE_RECIPE: dict[str, Any] = {"lr": 1e-3, "optimizer": "adamw", "weight_decay": 0.05, "schedule": "cosine",
                                "warmup": 0.0, "batch_size": 32, "label_smoothing": 0.0, "head_lr_scale": 1.0,
                                "backbone_lr_scale": 1.0, "stage_lr_decay": 1.0, "bias_lr_scale": 1.0,
                                "augment": "none", "mix": "none", "flip": "no", "ema": None, "patience": None,
                                "keep": "last", "budget": None, "freeze_epochs": 0, "freeze_stages": 0,
                                "freeze_bn": False, "micro_batch": None, "compile": False}


@dataclass(frozen=True)
class ProbeSummary:
    """What the probe before fine-tuning did, for the log and metrics.json."""

    epochs: int
    val_accuracy: float  # of the probed head on the validation features: where fine-tuning starts
    seconds: float  # the backbone's pass over train + validation images (unless cached) and the head's epochs
    features: FeatureSummary

    def describe(self) -> str:
        return (f"linear probe: the new head trained {self.epochs} epochs on the backbone's features "
                f"({self.features.cached_images:,} cached, {self.features.computed_images:,} computed) in "
                f"{self.seconds:.1f} s, validation accuracy {self.val_accuracy:.4f}; fine-tuning starts from it")

    def to_dict(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "val_accuracy": self.val_accuracy, "seconds": round(self.seconds, 3),
                "features": self.features.to_dict()}

    @classmethod
    def recorded(cls, record: Any) -> ProbeSummary | None:
        """The summary a checkpoint kept (to_dict's), for a resumed run's metrics; None where it kept none."""
        try:
            features = record["features"]
            computed, seconds = int(features["computed_images"]), float(features["seconds"])
            return cls(int(record["epochs"]), float(record["val_accuracy"]), float(record["seconds"]),
                       FeatureSummary(int(features["cached_images"]), computed, computed, seconds, seconds,
                                      str(features["folder"])))
        except (KeyError, TypeError, ValueError):
            return None


def probe_stage(config: TrainConfig, model: torch.nn.Module, data: Dataset, device: torch.device, world: World,
                saved: dict[str, Any] | None, log) -> ProbeSummary | None:
    """LP-FT's first half (Kumar et al., 2022): train `model`'s new head in place on the frozen backbone's
    features of the training images, so that fine-tuning starts from a head that already fits.

    A random head's first, large gradients flow back through the whole pretrained network and disturb the
    features the head is still learning to read; a fitted head sends small ones. The features cost one backbone
    pass over train and validation images (no gradients, about a third of a fine-tuning epoch), or none when an
    earlier --freeze backbone or probe run on the same images cached them. It runs in one process, as a frozen
    backbone does; a resumed run's checkpoint (`saved`) already holds the probed head and the probe's summary.
    """
    if not config.probe_epochs:
        return None
    if saved is not None:  # the checkpoint holds the probed head, and what the probe did for metrics.json
        recorded = ProbeSummary.recorded(saved["meta"].get("probe"))
        if recorded is None:
            log("linear probe: done before this checkpoint, which does not say what it did (an older cnnkit's); "
                "metrics.json leaves it out")
        return recorded
    if world.distributed:
        raise CnnkitError("--probe-epochs fits the head on cached features in one process: add --probe-epochs 0 "
                          "with --devices or torchrun (or --freeze-epochs N, which trains the head alone on the "
                          "images first)")
    check_sampler(config, data)  # the fine-tuning's refusal, before the probe's work rather than after it
    head, features, summary = frozen_features(model, data, device=device, batch_size=config.eval_batch_size,
                                              folder=features_folder(config.data_dir), log=log,
                                              splits=("train", "val"), use=LINEAR_PROBE)
    history = fit_probe(head, features, config)
    result = ProbeSummary(config.probe_epochs, history.history["val_accuracy"][-1],
                          summary.fit_seconds + history.train_seconds, summary)
    log(result.describe())
    return result


def fit_probe(head: torch.nn.Module, features: Dataset, config: TrainConfig) -> History:
    """Train `head` on the backbone's `features` for --probe-epochs epochs with the probe's own recipe."""
    return fit(head, features, progress=False,
               config=dataclasses.replace(config, epochs=config.probe_epochs, **PROBE_RECIPE))


def frozen_stage(config: TrainConfig, model: torch.nn.Module, data: Dataset, device: torch.device, world: World,
                 log) -> tuple[torch.nn.Module, Dataset, FeatureSummary | None]:
    """What fit() trains and on what: `model` on `data`, or with --freeze backbone its head on the backbone's
    cached features (engine/features.py), the head sharing `model`'s parameters."""
    if config.freeze != "backbone":
        return model, data, None
    if world.distributed:
        raise CnnkitError("--freeze backbone trains a head on cached features in one process: leave out --devices "
                          "and torchrun (the backbone pass is the only costly part, and it is done once)")
    head, features, summary = frozen_features(model, data, device=device, batch_size=config.eval_batch_size,
                                              folder=features_folder(config.data_dir), log=log)
    log(summary.describe())
    return head, features, summary

"""Stage 4, fit: what trains on what. The whole model on the images, or, with --freeze backbone, its head on
the backbone's cached features (engine/features.py)."""

from __future__ import annotations

import torch

from cnnkit.config import TrainConfig
from cnnkit.data.tensors import Dataset
from cnnkit.errors import CnnkitError
from cnnkit.engine.distributed import World
from cnnkit.engine.features import FeatureSummary, features_folder, frozen_features


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

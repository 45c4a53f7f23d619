"""The training loop: callback calls around a train step, visible top to bottom in `fit`.

Everything that is not the step itself (progress, History, early stopping, weight selection, EMA, a
user's own hooks) is a callback (engine/callbacks/), and every option comes from the one schema
(config.TrainConfig), so a new feature adds a callback or a schema field, not a branch in this loop.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from cnnkit.config import TrainConfig, default_of, field_types, fit_config, schema, selection_conflict
from cnnkit.data.augment import resolve_flip, training_augmentation
from cnnkit.data.mix import make_mix, mixed_cross_entropy
from cnnkit.data.balance import balanced_class_weights
from cnnkit.data.disk import DiskImages
from cnnkit.data.tensors import Dataset, Split, batches_per_epoch, train_batches
from cnnkit.engine.callbacks import EMA, BatchLogs, Callback, CallbackList, EarlyStopping, History, ProgressBar
from cnnkit.engine.callbacks import FreezeBackbone
from cnnkit.engine.callbacks import TrainState
from cnnkit.engine.callbacks import TerminateOnNaN
from cnnkit.engine.callbacks import TimeBudget
from cnnkit.engine.callbacks import WeightSelection
from cnnkit.engine.cpu import keep_freed_memory
from cnnkit.engine.checkpoint import check_resumed_position, restore_training, restoring
from cnnkit.engine.distributed import World, all_reduce_sum, broadcast_buffers, current_world, epoch_seed
from cnnkit.engine.distributed import process_device, wrap_model
from cnnkit.engine.evaluate import loss_and_accuracy
from cnnkit.engine.logs import RAW_WEIGHTS
from cnnkit.engine.inference import autocast, resolve_device, resolve_precision
from cnnkit.engine.optim import SCHEDULES, make_optimizer, set_lr
from cnnkit.errors import CnnkitError
from cnnkit.models.classifier import init_from_data, model_input, takes_pixels
from cnnkit.models.pretrained import frozen_stages

#: Images that data-initialised layers (airbench's whitening) see: ~2M 2x2 patches at 32x32, plenty for a
#: 12x12 covariance, and a fraction of a second.
DATA_INIT_IMAGES = 2000


def keep_batchnorm_statistics(model: nn.Module) -> None:
    """BatchNorm layers in eval mode while the rest trains: they normalise with their stored (pretrained) running
    statistics and never update them. On a few hundred images, batches of 32 re-estimate ImageNet statistics
    badly: a lite0 head trained on 146 CIFAR photos swung between 62% and 19% validation accuracy from epoch to
    epoch with them updating."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@contextlib.contextmanager
def stages_kept(model: nn.Module, count: int) -> Iterator[list[nn.Module]]:
    """--freeze-stages: the backbone's first `count` stages (models.pretrained.frozen_stages) without gradients
    while training, so autograd records nothing through them and their backward pass, the costliest part of a
    fine-tuning step at 160 px and more, is skipped; fit() also runs them in eval mode. Trainable again after."""
    stages = frozen_stages(model, count)
    fixed = [parameter for stage in stages for parameter in stage.parameters() if parameter.requires_grad]
    for parameter in fixed:
        parameter.requires_grad_(False)
    try:
        yield stages
    finally:
        for parameter in fixed:
            parameter.requires_grad_(True)


def fit(
    model: nn.Module,
    data: Dataset,
    epochs: int | None = None,
    batch_size: int | None = None,
    *,
    callbacks: Iterable[Callback] = (),
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    resume: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    **options: Any,
) -> History:
    """Train `model` on `data.train`, validating on `data.val` after every epoch; returns the History.

    `options` are the fit options of `cnnkit.TrainConfig` (lr, optimizer, schedule, patience, ema, ...),
    with its defaults: the tutorial's recipe. The model is moved to the device and trained in place and
    ends with the weights that `keep` selects (`history.selected` says which). Shuffling and augmentation
    draw from a generator seeded by `seed`, so on the CPU the same seed gives the same numbers.
    Any nn.Module trains: cnnkit's models take uint8 pixels and rescale inside; a plain PyTorch module
    gets them as float32 pixel values 0-255 (as Keras casts its input; `evaluate`/`predict` do the same).
    Under torchrun (an initialised process group) every process calls fit() and it trains data-parallel:
    DistributedDataParallel, each rank its share of every global batch, validation reduced over the
    whole split; `rank`/`world_size`, when given, must be the process group's.
    `resume` is a state read from a checkpoint (engine.checkpoint.read_checkpoint) of a fit() with the same
    model, data and options: training goes on after its epoch as if it had never stopped.
    `config`, a resolved TrainConfig (what `cnnkit.train` passes), gives every option at once; keywords given
    beside it override its values. `inspect.signature(fit)` (and an IDE's help) lists every option.
    """
    if config is None or options or epochs is not None or batch_size is not None:
        base = config.fit_options() if config is not None else {}
        given = {key: value for key, value in (("epochs", epochs), ("batch_size", batch_size)) if value is not None}
        config = fit_config(**{**base, **options, **given})
    world = check_world(rank, world_size)
    check_sampler(config, data)
    keep_freed_memory()  # as cnnkit.train does, for fit() called on its own (an audit's folds, a notebook)
    device = process_device(resolve_device(config.device), world)
    precision = resolve_precision(config.precision, device)
    on_features = data.train.features  # a frozen backbone's cached features (engine/features.py): a head trains
    memory_format = torch.channels_last if config.channels_last and not on_features else torch.contiguous_format
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest kernels once
    model.to(device=device, memory_format=memory_format)
    train, val = data.train.to(device, memory_format), data.val.to(device, memory_format)
    init_from_data(model, data_init_sample(model, train))
    if resume is not None:
        with restoring("resume"):
            model.load_state_dict(resume["model"])
    peak_lr = config.lr * (world.world_size if config.scale_lr else 1)
    optimizer = make_optimizer(model, config.optimizer, peak_lr, config.weight_decay,
                               backbone_lr_scale=config.backbone_lr_scale, bias_lr_scale=config.bias_lr_scale,
                               head_lr_scale=config.head_lr_scale, stage_lr_decay=config.stage_lr_decay)
    schedule = SCHEDULES.get(config.schedule)
    augment, mix = batch_transforms(config, data)
    class_weights = balanced_class_weights(data.train.labels, len(data.classes)).to(device) \
        if config.class_weight == "balanced" else None
    pixels = takes_pixels(model)  # cnnkit's models rescale uint8 inside; a plain module gets float pixels
    generator = torch.Generator().manual_seed(config.seed)  # shuffling: the same permutation on every rank
    # One process draws augmentation from the same generator; ranks draw their own, re-seeded each epoch.
    draws = torch.Generator() if world.distributed else generator
    steps_per_epoch = batches_per_epoch(len(train), config.batch_size, world.world_size)
    state = TrainState(model, optimizer, val, device, config.epochs, steps_per_epoch, config.eval_batch_size,
                       generator=generator, initial_epoch=resume["epoch"] if resume else 0,
                       score=validation_scorer(val, world, config.eval_batch_size))
    state.weight_sources[RAW_WEIGHTS] = model.state_dict
    history = History()
    chosen = [*builtin_callbacks(config, data.val_source, progress and world.is_main), *callbacks, history]
    with stages_kept(model, config.freeze_stages) as fixed, CallbackList(chosen, state) as hooks:
        # After the kept stages' freeze: DDP syncs what trains. The head-only epochs' freeze comes later.
        head_only = config.freeze_epochs > (resume["epoch"] if resume else 0)
        step_model = wrap_model(model, device, world, config.sync_bn, parameters_rest=head_only)
        step_model = torch.compile(step_model) if config.compile else step_model
        hooks.on_train_begin()
        if resume is not None:
            with restoring("resume"):
                restore_training(state, resume)
            check_resumed_position(state, resume)
        logs: dict[str, Any] = {}
        # state.epochs, not config.epochs: a time budget (TimeBudget) may shorten the run after its first epoch.
        for epoch in itertools.count(state.initial_epoch + 1):
            if epoch > state.epochs or state.stop_training:  # the end, or a resumed run that had stopped early
                break
            state.begin_epoch(epoch)
            if world.distributed:
                draws.manual_seed(epoch_seed(config.seed, world.rank, epoch))
            # Dropout and drop-path draw from torch's global generator: seeded per rank and epoch, so a seed repeats
            # a run (unseeded, two EfficientNet-Lite runs of seed 0 differed: 75.57% and 75.38%) and a resumed run
            # continues as the uninterrupted one would.
            torch.manual_seed(epoch_seed(config.seed, world.rank, epoch) + 1)
            hooks.on_epoch_begin(epoch)
            model.train()
            for stage in fixed:  # as at prediction: their BatchNorm statistics and stochastic depth fixed too
                stage.eval()
            if config.freeze_bn:
                keep_batchnorm_statistics(model)
            running = BatchLogs(device)
            # In memory: images indexed on the device; streamed from disk: read in shuffled chunks (data/disk.py).
            for batch, (images, labels) in enumerate(train_batches(train, config.batch_size, generator=generator,
                                                                   rank=world.rank, world_size=world.world_size,
                                                                   device=device,
                                                                   balanced=config.sampler == "balanced")):
                set_lr(optimizer, schedule(state.step, steps_per_epoch * state.epochs, peak_lr, config.warmup))
                images = augment(images, draws).contiguous(memory_format=memory_format)
                images, partners, lam = mix(images, labels, draws)
                optimizer.zero_grad(set_to_none=True)
                for part, last in micro_batches(len(labels), config.micro_batch):
                    with autocast(device, precision), gradient_sync(step_model, last):
                        logits = step_model(model_input(images[part], pixels))
                        loss = mixed_cross_entropy(logits, labels[part], partners[part], lam, config.label_smoothing,
                                                   class_weights)
                    (loss * (len(logits) / len(labels)) if config.micro_batch else loss).backward()
                    running.update(loss, logits, labels[part])
                optimizer.step()
                state.step += 1
                hooks.on_batch_end(batch, running)
            # Scored in fp32, as predict() and exported models will run it, whatever the training precision.
            val_loss, val_accuracy = state.score(model)
            logs = {**running.result(world), "val_loss": val_loss, "val_accuracy": val_accuracy,
                    "lr": optimizer.param_groups[0]["lr"]}
            hooks.on_epoch_end(epoch, logs)
            if state.stop_training:
                break
        hooks.on_train_end(logs)
    return history


def check_sampler(config: TrainConfig, data: Dataset) -> None:
    """Balanced draws pick images anywhere in the split, each epoch afresh; images on disk are read in shuffled
    chunks, each once an epoch (data/disk.py), so the two cannot go together."""
    if config.sampler == "balanced" and isinstance(data.train.images, DiskImages):
        raise CnnkitError("--sampler balanced draws images from anywhere in the training set, and these are read "
                          "from disk in chunks: add --stream no (or use --class-weight balanced, which streams)")


def batch_transforms(config: TrainConfig, data: Dataset) -> tuple[Any, Any]:
    """The augmentation and the mixing of training batches. Feature vectors get neither: they are a frozen
    backbone's view of each image, computed once, so an image transform cannot reach them."""
    if not data.train.features:
        return (training_augmentation(config.augment, resolve_flip(config.flip, data.mirror_ok)),
                make_mix(config.mix, config.mix_alpha))
    if config.augment != "none" or config.mix != "none" or config.flip == "yes":
        raise CnnkitError("fit() on feature vectors (a frozen backbone's): augment, mix and flip='yes' transform "
                          "images and cannot apply to them; leave them out")
    return training_augmentation("none", False), make_mix("none", config.mix_alpha)


def _signature() -> inspect.Signature:
    """fit()'s own parameters, then every fit option of the schema by name with its default (for help() and IDEs:
    the options stay one schema, config.TrainConfig, instead of a second list here)."""

    own = [parameter for parameter in inspect.signature(fit).parameters.values()
           if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    named = {parameter.name for parameter in own}
    options = [inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default_of(field),
                                 annotation=field_types()[field.name])
               for field in schema() if field.metadata["option"].scope == "fit" and field.name not in named]
    return inspect.signature(fit).replace(parameters=[*own, *options])


def data_init_sample(model: nn.Module, train: Split) -> torch.Tensor:
    """The first DATA_INIT_IMAGES training images, for layers set from data (init_from_data); for a split on
    disk an empty batch unless such a layer waits for them, as reading them would cost 2,000 images of memory."""
    waiting = any(hasattr(module, "init_from_data") and not bool(getattr(module, "initialized", 0))
                  for module in model.modules() if module is not model)
    return train.images[: DATA_INIT_IMAGES if waiting or not train.on_disk else 0]


def micro_batches(size: int, micro_batch: int | None) -> Iterator[tuple[slice, bool]]:
    """(slice, is_last) of each micro-batch of a batch of `size`; the whole batch when `micro_batch` is None."""
    step = micro_batch or size
    for start in range(0, size, step):
        yield slice(start, start + step), start + step >= size


def gradient_sync(step_model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's all-reduce only after a step's last micro-batch (its `no_sync` for the others)."""
    if last or not hasattr(step_model, "no_sync"):
        return contextlib.nullcontext()
    return step_model.no_sync()


def builtin_callbacks(config: TrainConfig, val_source: str, progress: bool) -> list[Callback]:
    """The callbacks the options ask for. Weight selection is always there, so every run records its choice."""
    if problem := selection_conflict(val_source == "test", config.keep, config.ema):
        raise CnnkitError(problem)
    keep = config.keep if config.keep != "auto" else ("last" if val_source == "test" else "best")
    chosen: list[Callback] = [WeightSelection(config.monitor, keep), TerminateOnNaN()]  # a NaN run is never a result
    if config.ema is not None:
        chosen.append(EMA(config.ema))
    if config.budget is not None:
        chosen.append(TimeBudget(config.budget))
    if config.freeze_epochs:
        chosen.append(FreezeBackbone(config.freeze_epochs))
    if config.patience is not None:
        chosen.append(EarlyStopping(config.monitor, config.patience))
    if progress:
        chosen.append(ProgressBar())
    return chosen


def check_world(rank: int | None, world_size: int | None) -> World:
    """The process group fit() trains in; explicit rank/world_size must agree with it (no silent misuse)."""
    world = current_world()
    wanted = World(world.rank if rank is None else rank, world.world_size if world_size is None else world_size)
    if (wanted.rank, wanted.world_size) == (world.rank, world.world_size):
        return world
    if not world.distributed:
        raise CnnkitError(f"fit(rank={rank}, world_size={world_size}) needs an initialised torch.distributed "
                          "process group of that size: start the processes with torchrun")
    raise CnnkitError(f"fit(rank={rank}, world_size={world_size}) disagrees with the process group "
                      f"(rank {world.rank} of {world.world_size}); leave them out")


def validation_scorer(val: Split, world: World, batch_size: int):
    """(loss, accuracy) of a model on the validation split; with several processes each scores its
    share and the sums are reduced, so every rank gets the figures of the whole split."""
    if not world.distributed:
        return lambda model: loss_and_accuracy(model, val, batch_size=batch_size)
    share = val.take(slice(world.rank, None, world.world_size))

    def score(model: nn.Module) -> tuple[float, float]:
        # Every rank scores the same model: BatchNorm statistics (and an EMA's averages of them) drift apart
        # between DDP's per-step broadcasts, as each rank's last forward updates its own copy.
        broadcast_buffers(model)
        loss, accuracy = loss_and_accuracy(model, share, batch_size=batch_size) if len(share) else (0.0, 0.0)
        sums = torch.tensor([loss * len(share), accuracy * len(share), len(share)], dtype=torch.float64,
                            device=share.labels.device)
        total_loss, correct, count = all_reduce_sum(sums, world).tolist()
        return total_loss / count, correct / count

    return score


fit.__signature__ = _signature()

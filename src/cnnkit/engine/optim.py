"""Optimizers and learning-rate schedules by name: adding one is one registered function.

A schedule maps (step, total_steps, peak, warmup fraction) to the learning rate of that step; the loop sets
it before every step, so a schedule is a pure function that tests can tabulate without training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from cnnkit.registry import Registry
from cnnkit.engine.muon import Muon
from cnnkit.models.classifier import head_parameters
from cnnkit.models.pretrained import stage_lr_factors

#: Keras's Adam epsilon (PyTorch's default is 1e-8), so `--optimizer adam` is the tutorial's optimizer.
KERAS_ADAM_EPSILON = 1e-7

#: A builder takes parameter groups (dicts with "params" and their own "weight_decay"), the peak rate and
#: the default weight decay; PyTorch optimizers accept such groups as they are.
OptimizerBuilder = Callable[[list[dict[str, Any]], float, float], torch.optim.Optimizer]
Schedule = Callable[[int, int, float, float], float]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")
SCHEDULES: Registry[Schedule] = Registry("schedule")


# Adam/AdamW use the fused kernel (one op for all tensors): measured 3.1 vs 3.6 ms per seed step.
@OPTIMIZERS.register("adam")
def adam(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay, eps=KERAS_ADAM_EPSILON, fused=True)


@OPTIMIZERS.register("adamw")
def adamw(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, eps=KERAS_ADAM_EPSILON, fused=True)


@OPTIMIZERS.register("sgd")
def sgd(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Nesterov momentum 0.9: the SGD variant every CIFAR speed run uses."""
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


#: airbench94_muon's momenta: 0.6 for the Muon kernels, 0.85 for the SGD-trained biases and head.
MUON_MOMENTUM = 0.6
MUON_SGD_MOMENTUM = 0.85


@OPTIMIZERS.register("muon")
def muon(groups: list[dict[str, Any]], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Muon (engine/muon.py) on every convolution kernel at `lr`; Nesterov SGD (momentum 0.85) on the rest
    (biases, BatchNorm, the head, any dense layer) at `lr` times their group's scale, with L2 decay. Muon
    fixes each kernel's norm, so kernels get no decay. The CIFAR-10 record's rates: kernels 0.24, biases and
    head far higher (see presets/cifar10-best.toml for the conversion)."""

    split: list[dict[str, Any]] = []
    for group in groups:
        kernels = [p for p in group["params"] if p.ndim == 4]
        rest = [p for p in group["params"] if p.ndim != 4]
        if kernels:
            split.append({**group, "params": kernels, "muon": True, "weight_decay": 0.0})
        if rest:
            split.append({**group, "params": rest, "muon": False, "momentum": MUON_SGD_MOMENTUM})
    return Muon(split, lr=lr, momentum=MUON_MOMENTUM, weight_decay=weight_decay)


def param_groups(model: nn.Module | Iterable[nn.Parameter], weight_decay: float,
                 backbone_lr_scale: float = 1.0, bias_lr_scale: float = 1.0,
                 head_lr_scale: float = 1.0, stage_lr_decay: float = 1.0) -> list[dict[str, Any]]:
    """The parameters split into optimizer groups by (weight decay, learning-rate scale).

    Weight decay applies only to weight matrices and kernels: BatchNorm/LayerNorm scales and shifts and
    every bias (all parameters with ndim <= 1) get none, the standard practice (decaying a norm's scale
    or a bias toward zero regularises nothing and fights the normalisation). With `backbone_lr_scale`
    below 1, everything but the model's head (`classifier.head_parameters`, the last nn.Linear) learns
    at that fraction of the rate: fine-tuning moves pretrained features less than the new head.
    `bias_lr_scale` multiplies the rate of every bias (BatchNorm shifts included, not its scales): the CIFAR
    speed runs train BatchNorm biases 64x faster than the weights (airbench's ablations: 94% in 17 instead
    of 22 epochs). `head_lr_scale` multiplies the head's rate (with Muon, whose kernel rate is on another
    scale than the SGD that trains the head). `stage_lr_decay` below 1 is layer-wise rate decay on a backbone
    built in stages (models.pretrained.stage_lr_factors): each stage learns that fraction of the next one's
    rate, on top of `backbone_lr_scale`. Groups at the full rate come first, so `param_groups[0]["lr"]` is the
    schedule's rate.
    """
    parameters = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    head: set[int] = set()
    if backbone_lr_scale != 1.0 or head_lr_scale != 1.0:
        if not isinstance(model, nn.Module):
            raise ValueError("backbone_lr_scale and head_lr_scale need the model, to tell its head from its backbone")
        head = {id(p) for p in head_parameters(model)}
    biases: set[int] = set()
    if bias_lr_scale != 1.0:
        if not isinstance(model, nn.Module):
            raise ValueError("bias_lr_scale needs the model, to tell biases by their names")
        biases = {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}
    stage_factors: dict[int, float] = {}
    if stage_lr_decay != 1.0:
        if not isinstance(model, nn.Module):
            raise ValueError("stage_lr_decay needs the model, to find its stages")
        stage_factors = stage_lr_factors(model, stage_lr_decay)
    grouped: dict[tuple[float, float], list[nn.Parameter]] = {}
    for parameter in parameters:
        decay = weight_decay if parameter.ndim > 1 else 0.0
        scale = head_lr_scale if id(parameter) in head else backbone_lr_scale
        scale *= bias_lr_scale if id(parameter) in biases else 1.0
        scale *= stage_factors.get(id(parameter), 1.0)
        grouped.setdefault((scale, decay), []).append(parameter)
    order = sorted(grouped, key=lambda key: (key[0] != 1.0, -key[0], -key[1]))
    return [{"params": grouped[key], "weight_decay": key[1], "lr_scale": key[0]} for key in order]


def make_optimizer(model: nn.Module | Iterable[nn.Parameter], name: str, lr: float, weight_decay: float,
                   *, backbone_lr_scale: float = 1.0, bias_lr_scale: float = 1.0,
                   head_lr_scale: float = 1.0, stage_lr_decay: float = 1.0) -> torch.optim.Optimizer:
    """The named optimizer over `param_groups(model, ...)` (no decay on norms and biases)."""
    groups = param_groups(model, weight_decay, backbone_lr_scale, bias_lr_scale, head_lr_scale, stage_lr_decay)
    return OPTIMIZERS.get(name)(groups, lr, weight_decay)


def _warmup_steps(total_steps: int, warmup: float) -> int:
    return max(1, round(warmup * total_steps))


@SCHEDULES.register("constant")
def constant(step: int, total_steps: int, peak: float, warmup: float) -> float:
    """The tutorial's (and Keras's default) fixed rate; warm-up is ignored."""
    return peak


@SCHEDULES.register("onecycle")
def onecycle(step: int, total_steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up to `peak`, then linear decay to zero at the last step."""
    warmup_steps = _warmup_steps(total_steps, warmup)
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    remaining = max(1, total_steps - warmup_steps)
    return peak * max(0.0, 1.0 - (step - warmup_steps) / remaining)


@SCHEDULES.register("cosine")
def cosine(step: int, total_steps: int, peak: float, warmup: float) -> float:
    """Linear warm-up to `peak`, then half a cosine down to zero at the last step."""
    warmup_steps = _warmup_steps(total_steps, warmup) if warmup > 0 else 0
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate: `lr` times the group's "lr_scale" (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

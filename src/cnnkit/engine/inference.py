"""Batched forward passes without gradients: the one place evaluation and prediction run the model."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from cnnkit.engine.cpu import keep_freed_memory
from cnnkit.models.classifier import model_input, takes_pixels
from cnnkit.errors import CnnkitError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnkitError("--device cuda was asked for, but PyTorch sees no CUDA GPU on this machine")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 math runs faster than fp32 here: CUDA with bf16, or a CPU with AMX tiles.

    Elsewhere 'auto' precision stays fp32. oneDNN's own check (mkldnn._is_mkldnn_bf16_supported) says yes
    for plain AVX-512, where bf16 is emulated: measured 4x slower than fp32 (airbench-width net). AVX512-BF16
    without AMX is slower too: on a Xeon with avx512_bf16 and no AMX (2 cores, torch 2.13), a training step
    of the airbench94-width net took 253 vs 132 s per 50k images at batch 128, and of the 32/64/128 net
    57.6 vs 41.9 s; with AMX the same net's bf16 was the faster (~100 s per 50k at batch 256).
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_amx_tile_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' where the device runs it natively, else 'fp32'; explicit choices pass through."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters are; the CPU for a model that has none (a hand-written one may not)."""
    return next(model.parameters(), torch.empty(0)).device


@torch.inference_mode()
def predict_logits(
    model: nn.Module, images: torch.Tensor, *, batch_size: int = 1000, precision: str = "fp32"
) -> torch.Tensor:
    """Float32 logits for uint8 images (N, C, H, W), in large batches, in eval mode.

    The model's training/eval mode is restored afterwards, so a validation pass in the middle of
    fit() leaves BatchNorm layers training.
    """

    keep_freed_memory()  # every command's forward passes, not only training's (engine/cpu.py says why)
    pixels = takes_pixels(model)  # else a plain nn.Module: float pixel values, as fit() gave it
    device = model_device(model)
    was_training = model.training
    model.eval()
    outputs = []
    try:
        with autocast(device, precision):
            for start in range(0, len(images), batch_size):
                batch = images[start : start + batch_size].to(device, non_blocking=True)
                outputs.append(model(model_input(batch, pixels)).float())
    finally:
        model.train(was_training)
    if not outputs:
        return torch.empty((0, 0), device=device)
    return torch.cat(outputs)

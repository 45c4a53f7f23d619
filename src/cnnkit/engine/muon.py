"""Muon for convolution kernels, Nesterov SGD for everything else: one optimizer, one state dict.

Muon (Keller Jordan, 2024) replaces a weight matrix's momentum step by its nearest semi-orthogonal matrix,
found with a few Newton-Schulz iterations: every direction of the update moves at the same rate, which lets
a short run take large steps. The CIFAR-10 speed record airbench94_muon (94.01% in 8 epochs) applies it to
every convolution kernel, viewed as an (out, in*kh*kw) matrix, and trains the rest (biases, the linear head)
with Nesterov SGD. `torch.optim.Muon` takes 2-D parameters only, so this is cnnkit's own optimizer for that
split, with the same iteration as torch's (the quintic of the Muon paper) and airbench's two further habits:
each kernel is rescaled to Frobenius norm sqrt(out) before its step (BatchNorm follows every kernel, so the
scale carries no meaning and fixing it keeps the step size relative), and 3 iterations (enough, measured
there; torch's default is 5).

A group with "muon": True is a group of kernels; the others are plain Nesterov SGD (L2 weight decay added to
the gradient, as torch.optim.SGD). A single torch.optim.Optimizer, so checkpoints and resume treat it like
any other.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

#: The quintic Newton-Schulz coefficients of Muon (also torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """An approximately semi-orthogonal matrix with `matrix`'s singular vectors (singular values ~0.5-1.5).

    Runs in float32: on CPUs without AMX, bf16 matrix products are slower than float32 ones.
    """
    a, b, c = NS_COEFFICIENTS
    x = matrix.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A kernel (out, in, kh, kw) as an (out, in*kh*kw) matrix. Any order of the columns serves (the
    orthogonalisation commutes with permuting them), so a channels_last kernel is read in its own order."""
    if tensor.is_contiguous():
        return tensor.reshape(tensor.shape[0], -1)
    return tensor.permute(0, 2, 3, 1).reshape(tensor.shape[0], -1)


class Muon(torch.optim.Optimizer):
    """Muon on groups marked "muon": True (kernels of 2 or more dimensions), Nesterov SGD on the others.

    `lr` and `momentum` are defaults a group may override (airbench94_muon: kernels 0.24 with momentum 0.6,
    SGD groups momentum 0.85); `ns_steps` Newton-Schulz iterations per kernel step.
    """

    def __init__(self, groups: Iterable[dict[str, Any]], lr: float, momentum: float = 0.6,
                 weight_decay: float = 0.0, ns_steps: int = 3) -> None:
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "muon": False,
                    "ns_steps": ns_steps}
        super().__init__(list(groups), defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices and kernels only (ndim >= 2)")

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for parameter in group["params"]:
                if parameter.grad is None:
                    continue
                update = self._nesterov(parameter, group)
                if group["muon"]:
                    shape = parameter.shape
                    parameter.mul_(shape[0] ** 0.5 / parameter.norm().clamp_min(1e-12))
                    direction = orthogonalize(as_matrix(update), group["ns_steps"])
                    if parameter.is_contiguous():
                        direction = direction.view(shape)
                    else:  # back from (out, kh, kw, in) order
                        direction = direction.view(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
                    parameter.add_(direction.to(parameter.dtype), alpha=-group["lr"])
                else:
                    parameter.add_(update, alpha=-group["lr"])
        return loss

    def _nesterov(self, parameter: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """gradient (+ L2 decay) + momentum * buffer, after buffer = momentum * buffer + that gradient."""
        gradient = parameter.grad
        if group["weight_decay"] and not group["muon"]:
            gradient = gradient.add(parameter, alpha=group["weight_decay"])
        state = self.state[parameter]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(gradient, memory_format=torch.preserve_format)
        buffer = state["momentum_buffer"]
        buffer.mul_(group["momentum"]).add_(gradient)
        return gradient.add(buffer, alpha=group["momentum"])

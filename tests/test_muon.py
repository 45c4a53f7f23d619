"""Muon for convolution kernels and micro-batched steps: the invariants each must keep.

- The Newton-Schulz iteration gives a matrix whose singular values sit near 1 (the orthogonalised update),
  for wide and tall matrices alike.
- A kernel's step does not depend on its memory layout (channels_last is read in its own column order).
- Each kernel is rescaled to norm sqrt(out) before its step; biases and the head take Nesterov SGD with
  their own rates, and `--optimizer muon` puts every kernel in a Muon group and nothing else.
- A step on micro-batches sums to the step on the whole batch (a model without BatchNorm: same weights).
- A run trained with Muon resumes bit for bit (its state dict is an ordinary optimizer's).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnkit.engine.fit import fit, micro_batches
from cnnkit.engine.muon import Muon, as_matrix, orthogonalize
from cnnkit.engine.optim import make_optimizer, set_lr
from cnnkit.models import build_model
from slices import mnist_dataset


@pytest.mark.parametrize("shape", [(64, 216), (256, 64), (10, 10)])
def test_orthogonalize_puts_singular_values_near_one(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(orthogonalize(matrix))
    # Muon's quintic trades exactness for speed: singular values land in roughly (0.5, 1.5), not exactly 1,
    # while the input's spread over a factor of 3 (256x64) to over 100 (10x10).
    assert torch.linalg.svdvals(matrix).max() / torch.linalg.svdvals(matrix).min() > 2.5
    assert singular.min() > 0.3 and singular.max() < 1.6, singular


def test_the_update_keeps_the_singular_vectors():
    matrix = torch.randn(32, 72, generator=torch.Generator().manual_seed(1))
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    projected = u.T @ orthogonalize(matrix) @ vh.T  # diagonal when the singular vectors are shared
    off_diagonal = projected - torch.diag(torch.diagonal(projected))
    assert off_diagonal.abs().max() < 0.05 * torch.diagonal(projected).abs().min()


def _one_muon_step(kernel: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    parameter = nn.Parameter(kernel.clone())
    parameter.grad = grad.clone()
    Muon([{"params": [parameter], "muon": True}], lr=0.1).step()
    return parameter.detach()


def test_a_kernel_step_does_not_depend_on_its_memory_layout():
    generator = torch.Generator().manual_seed(2)
    kernel, grad = torch.randn(16, 8, 3, 3, generator=generator), torch.randn(16, 8, 3, 3, generator=generator)
    plain = _one_muon_step(kernel, grad)
    channels_last = _one_muon_step(kernel.contiguous(memory_format=torch.channels_last),
                                   grad.contiguous(memory_format=torch.channels_last))
    assert not as_matrix(kernel.contiguous(memory_format=torch.channels_last)).equal(as_matrix(kernel))
    assert torch.allclose(plain, channels_last, atol=1e-5)
    assert not torch.allclose(plain, kernel * 16**0.5 / kernel.norm(), atol=1e-3)  # it did move


def test_kernels_are_rescaled_to_norm_sqrt_out_before_their_step():
    kernel = torch.randn(16, 8, 3, 3) * 7.0
    stepped = _one_muon_step(kernel, torch.zeros_like(kernel))  # a zero update: only the rescaling shows
    assert stepped.norm().item() == pytest.approx(16**0.5, rel=1e-5)


def test_sgd_groups_take_nesterov_steps_with_l2_decay():
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    weight.grad = torch.tensor([0.5, 0.5])
    optimizer = Muon([{"params": [weight], "muon": False, "momentum": 0.85, "weight_decay": 0.1}], lr=0.2)
    optimizer.step()
    gradient = torch.tensor([0.5, 0.5]) + 0.1 * torch.tensor([1.0, -2.0])
    # First step: buffer = g, update = g + 0.85 * buffer.
    assert torch.allclose(weight.detach(), torch.tensor([1.0, -2.0]) - 0.2 * 1.85 * gradient)


def test_the_muon_optimizer_splits_kernels_from_the_rest():
    model = build_model("airbench", (3, 32, 32), 10, widths=[16, 32, 32], bn_scale=False, head_std=1.0)
    optimizer = make_optimizer(model, "muon", 0.24, 3e-6, bias_lr_scale=400.0, head_lr_scale=5000.0)
    set_lr(optimizer, 0.24)  # what fit() does before every step: each group's rate is lr times its scale
    kernels = {id(p) for m in model.modules() if isinstance(m, nn.Conv2d) for p in [m.weight]}
    for group in optimizer.param_groups:
        ids = {id(p) for p in group["params"]}
        assert group["muon"] == bool(ids & kernels) and (not group["muon"] or ids <= kernels)
    head = next(g for g in optimizer.param_groups if any(p.ndim == 2 for p in g["params"]))
    assert head["lr"] == pytest.approx(0.24 * 5000.0) and head["weight_decay"] == 3e-6 and head["momentum"] == 0.85
    biases = next(g for g in optimizer.param_groups if g["lr_scale"] == 400.0)
    assert all(p.ndim == 1 for p in biases["params"]) and biases["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["muon"] and optimizer.param_groups[0]["lr"] == 0.24
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.ndim == 1 or p.shape[-1] == 2 for p in frozen)  # BN scales and the whitening kernel


def test_micro_batches_cover_the_batch_once():
    parts = list(micro_batches(10, 4))
    assert [(p.start, p.stop, last) for p, last in parts] == [(0, 4, False), (4, 8, False), (8, 12, True)]
    assert [(p.start, p.stop, last) for p, last in micro_batches(10, None)] == [(0, 10, True)]


def test_a_micro_batched_step_equals_the_whole_batch_step():
    data = mnist_dataset(limit_train=512, limit_eval=100)
    options = dict(epochs=1, batch_size=128, lr=1e-3, optimizer="sgd", precision="fp32", seed=0, progress=False)
    whole = build_model("seed", data.input_shape, data.num_classes, seed=0)  # no BatchNorm, no dropout
    split = build_model("seed", data.input_shape, data.num_classes, seed=0)
    fit(whole, data, **options)
    fit(split, data, micro_batch=32, **options)
    for (name, a), b in zip(whole.state_dict().items(), split.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    assert not torch.equal(whole.state_dict()["body.0.weight"],
                           build_model("seed", data.input_shape, data.num_classes, seed=0).state_dict()["body.0.weight"])

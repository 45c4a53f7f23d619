"""`airbench`: a compact three-stage CNN in the style of the CIFAR-10 speed runs (airbench, Keller Jordan).

What makes that family fast to train, kept here as ideas (the code is cnnkit's own):
- a first layer that whitens 2x2 patches, computed once from training images and then frozen (only its
  bias trains), so the first stage sees decorrelated input from step one;
- three stages of conv -> max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU (pooling before
  normalisation runs BN on a quarter of the activations), widths 64/256/256 in airbench94;
- identity-like (Dirac) initialisation of each convolution's first channels, so a fresh net passes its
  input through and learns corrections;
- a global max-pool and a bias-free linear head whose output is scaled down (1/9), which keeps the early
  logits small and the high learning rates of those runs stable.
Any input size works (global pooling: parameters do not grow with the image).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cnnkit.models.registry import register_model


class PatchWhitening(nn.Module):
    """A frozen convolution that whitens k x k patches (ZCA-like, with each direction also negated).

    `init_from_data` sets it from a sample of training images (already rescaled); until then it is the
    identity-free random init and `initialized` is 0, which `fit` checks. Its weights are saved with the
    model, so a loaded model never needs the data again.
    """

    def __init__(self, in_channels: int, kernel: int = 2, eps: float = 5e-4) -> None:
        super().__init__()
        directions = in_channels * kernel * kernel
        self.conv = nn.Conv2d(in_channels, 2 * directions, kernel, padding=0, bias=True)
        self.conv.weight.requires_grad_(False)
        nn.init.zeros_(self.conv.bias)
        self.eps = eps
        self.register_buffer("initialized", torch.zeros((), dtype=torch.uint8))

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Eigen-decompose the covariance of all k x k patches of `images` (N, C, H, W floats)."""
        kernel = self.conv.kernel_size[0]
        patches = images.float().unfold(2, kernel, 1).unfold(3, kernel, 1)  # N, C, H', W', k, k
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * kernel * kernel).double()
        patches = patches - patches.mean(dim=0)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = (eigenvectors.T / torch.sqrt(eigenvalues.clamp_min(0) + self.eps)[:, None]).float()
        filters = filters.view(-1, images.shape[1], kernel, kernel)
        self.conv.weight.copy_(torch.cat([filters, -filters]))
        self.initialized.fill_(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.conv(images)


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    dirac_init(conv)
    return conv


def dirac_init(conv: nn.Conv2d) -> None:
    """Kaiming init plus an identity kernel on the first min(in, out) channels."""
    with torch.no_grad():
        count = min(conv.in_channels, conv.out_channels)
        nn.init.dirac_(conv.weight[:count])


def batch_norm(channels: int, momentum: float, scale: bool) -> nn.BatchNorm2d:
    """BatchNorm whose scales train only when `scale` (airbench freezes them at 1: the following
    convolution can scale its input itself, and a frozen scale lets the biases take 64x larger steps)."""
    norm = nn.BatchNorm2d(channels, momentum=momentum)
    norm.weight.requires_grad_(scale)
    return norm


class ConvGroup(nn.Sequential):
    """conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU: one stage, halving the resolution."""

    def __init__(self, in_channels: int, out_channels: int, bn_momentum: float, bn_scale: bool = True) -> None:
        super().__init__(
            conv3x3(in_channels, out_channels),
            nn.MaxPool2d(2),
            batch_norm(out_channels, bn_momentum, bn_scale),
            nn.GELU(),
            conv3x3(out_channels, out_channels),
            batch_norm(out_channels, bn_momentum, bn_scale),
            nn.GELU(),
        )


class ScaledLinear(nn.Linear):
    """A bias-free linear head whose output is multiplied by a constant (small logits at the start)."""

    def __init__(self, in_features: int, out_features: int, scale: float) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features) * self.scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale:g}"


@register_model("airbench", "Compact 3-stage CNN after the CIFAR-10 speed runs: frozen patch-whitening stem, "
                            "conv-pool-BN-GELU stages, max-pool head (kwargs: widths, whiten_kernel, bn_scale, "
                            "head_scale, head_std)",
                standardize=True)
def airbench(input_shape: tuple[int, int, int], num_classes: int, widths: Sequence[int] = (64, 256, 256),
             whiten_kernel: int = 2, head_scale: float = 1 / 9, bn_momentum: float = 0.4, bn_scale: bool = True,
             head_std: float | None = None) -> nn.Module:
    """`bn_scale=False` freezes BatchNorm scales; `head_std` re-draws the head's weights to that standard
    deviation (airbench94_muon: std 1 with head_scale 1/width) instead of PyTorch's default."""
    whitening = PatchWhitening(input_shape[0], whiten_kernel)
    stages, width = [], whitening.out_channels
    for out in widths:
        stages.append(ConvGroup(width, out, bn_momentum, bn_scale))
        width = out
    head = ScaledLinear(width, num_classes, head_scale)
    if head_std is not None:
        with torch.no_grad():
            head.weight.mul_(head_std / head.weight.std())
    return nn.Sequential(whitening, nn.GELU(), *stages, nn.AdaptiveMaxPool2d(1), nn.Flatten(), head)

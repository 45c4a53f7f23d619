"""`resnet`: residual networks with depth and width as parameters (He et al.; WRN-style widening).

One builder covers the CIFAR-style ResNet-6n+2 (three stages of n basic blocks at widths w, 2w, 4w) and
the wide ResNets of Zagoruyko & Komodakis (WRN-d-k: pre-activation blocks, widths 16k, 32k, 64k), which
the Fashion-MNIST benchmark table lists at 96.3-96.7%. Pre-activation (BN-ReLU before each conv) is the
default: it trains deep stacks without warm-up tricks. Small images (< 96 px) keep full resolution in the
stem, as CIFAR nets do; photo-sized ones get a strided stem and pooling, so the first stage runs at 1/4 of
the pixels. The head is global average pooling and one linear layer, so parameters do not grow with
the image size.
"""

from __future__ import annotations

from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models.registry import register_model

PHOTO_SIDE = 96  # from this side up, the stem downsamples by 4 (ImageNet-style)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut; pre-activation (BN-ReLU-conv) or standard (conv-BN-ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, preact: bool) -> None:
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(in_channels if preact else out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)]
            self.shortcut = nn.Sequential(*layers) if preact else nn.Sequential(*layers, nn.BatchNorm2d(out_channels))
        if not preact:  # the residual branch starts as zero: each block begins as the identity
            nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        if self.preact:
            out = self.relu(self.bn1(x))
            shortcut = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
            out = self.conv2(self.relu(self.bn2(self.conv1(out))))
            return out + shortcut
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def stem(in_channels: int, width: int, side: int, preact: bool) -> list[nn.Module]:
    """3x3 conv at full resolution for small images; strided conv + max-pool for photos."""
    if side < PHOTO_SIDE:
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)]
    else:
        layers = [nn.Conv2d(in_channels, width, 3, 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                  nn.MaxPool2d(3, 2, 1)]
        return layers
    return layers if preact else [*layers, nn.BatchNorm2d(width), nn.ReLU(inplace=True)]


@register_model("resnet", "ResNet/WRN family for any image size: depth 6n+2 (or 6n+4 with widen), width, widen, "
                          "preact (kwargs), global-average-pool head", standardize=True)
def resnet(input_shape: tuple[int, int, int], num_classes: int, depth: int = 20, width: int = 16,
           widen: int = 1, preact: bool = True) -> nn.Module:
    blocks = blocks_per_stage(depth)
    channels = [width * widen * 2**stage for stage in range(3)]
    layers = stem(input_shape[0], width, min(input_shape[1:]), preact)
    in_channels = width
    for stage, out_channels in enumerate(channels):
        for block in range(blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            layers.append(BasicBlock(in_channels, out_channels, stride, preact))
            in_channels = out_channels
    if preact:
        layers += [nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_channels, num_classes)]
    model = nn.Sequential(*layers)
    _kaiming_init(model)
    return model


def blocks_per_stage(depth: int) -> int:
    """Basic blocks per stage: depth = 6n + 2 (ResNet-20/32/56) or 6n + 4 (WRN-16/28/40, 1x1 shortcuts counted)."""
    for extra in (2, 4):
        if depth >= 8 and (depth - extra) % 6 == 0:
            return (depth - extra) // 6
    raise CnnkitError(f"resnet depth must be 6n+2 (8, 14, 20, 32, 56, ...) or 6n+4 (10, 16, 28, 40, ...), got {depth}")


def _kaiming_init(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

"""ResNet-18/34/50 (He et al.) for ImageNet-sized inputs, written here in timm's parameter layout.

timm's ResNet keeps torchvision's names (conv1, bn1, layer1..layer4 with conv1/bn1/conv2/bn2[/conv3/bn3] and
downsample.0/.1, fc) and puts the stride of a bottleneck on its 3x3 convolution ("ResNet v1.5"), so timm's
ImageNet safetensors from the Hugging Face Hub (`--pretrained hf-hub:timm/resnet50.a1_in1k`) load as they are.
cnnkit's own `resnet` (models/resnet.py) is the CIFAR family for small images; these are the ImageNet ones, to
start from pretrained weights. Like EfficientNet-Lite they repeat a grayscale channel and resize the input to
`resolution` inside the network, so a 28x28 digit or a 32x32 photo reaches the weights at the size they know.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.models.efficientnet_lite import adapt_input
from cnnkit.models.registry import register_model

#: Name -> (block kind, blocks per stage).
VARIANTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = shortcut(in_channels, channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        out = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = shortcut(in_channels, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """The projection of a block's input when its shape changes (a 1x1 convolution and BatchNorm), else None."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels))


class ResNet(nn.Module):
    """Stem (7x7/2 convolution, 3x3/2 max pool), four stages, global average pool, `fc`."""

    def __init__(self, kind: str, repeats: tuple[int, ...], num_classes: int = 1000, in_channels: int = 3,
                 resolution: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        self.repeat_gray = in_channels == 1
        self.resolution = resolution
        block = BasicBlock if kind == "basic" else Bottleneck
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels, stages = 64, []
        for index, count in enumerate(repeats):
            width = 64 * 2**index
            blocks = []
            for repeat in range(count):
                blocks.append(block(channels, width, 2 if index > 0 and repeat == 0 else 1))
                channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = channels
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, 512 or 2048, H/32, W/32)."""
        x = adapt_input(x, self.repeat_gray, self.resolution)
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean((2, 3))
        return pooled if pre_logits else self.fc(self.dropout(pooled))

    def head_module(self) -> nn.Module:
        """What follows the pooled vector, sharing this model's parameters (engine/features.py trains it)."""
        return nn.Sequential(self.dropout, self.fc)

    def stages(self) -> list[nn.Module]:
        """The backbone in input order, the stem first, then its 4 stages: what --freeze-stages counts."""
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    """He initialisation of the convolutions, as timm and torchvision do; the last BatchNorm scale of each block
    at zero (each residual branch starts as the identity), which trains a deep ResNet from scratch more steadily."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            nn.init.zeros_((module.bn2 if isinstance(module, BasicBlock) else module.bn3).weight)


def resnet(variant: str, input_shape: tuple[int, int, int], num_classes: int, resolution: int | None = None,
           dropout: float = 0.0) -> ResNet:
    if input_shape[0] not in (1, 3):
        raise ValueError(f"{variant} takes 1- or 3-channel images, not {input_shape[0]}")
    if resolution is not None and not 32 <= int(resolution) <= 1024:
        raise ValueError(f"resolution must be from 32 to 1024 pixels, got {resolution}")
    kind, repeats = VARIANTS[variant]
    return ResNet(kind, repeats, num_classes, input_shape[0], None if resolution is None else int(resolution),
                  float(dropout))


def _register(variant: str) -> None:
    kind, repeats = VARIANTS[variant]

    @register_model(variant, f"ResNet-{variant[6:]} for ImageNet-sized inputs ({kind} blocks {list(repeats)}), "
                             "timm's layout: --pretrained hf-hub:timm/<name> (e.g. timm/resnet50.a1_in1k)")
    def build(input_shape: tuple[int, int, int], num_classes: int, resolution: int | None = None,
              dropout: float = 0.0) -> nn.Module:
        return resnet(variant, input_shape, num_classes, resolution, dropout)


for _variant in VARIANTS:
    _register(_variant)

"""EfficientNet-Lite0/1/2 (Tan & Le; the "Lite" variants for mobile CPUs), written here in timm's parameter layout.

Lite differs from EfficientNet-B*: ReLU6 instead of swish, no squeeze-and-excitation, and a stem and head
that do not grow with the width multiplier. The ImageNet weights cnnkit starts from were trained in
TensorFlow, so convolutions pad the TensorFlow way ("SAME": a stride-2 convolution pads more on the right and
bottom) and BatchNorm uses TensorFlow's epsilon (1e-3); with symmetric padding the same weights give other
logits. Parameter names follow timm's `tf_efficientnet_lite*` (conv_stem, bn1, blocks.S.B.conv_dw, ...), so
weights in timm's layout load as they are and others are renamed once (models/pretrained.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.models.registry import register_model

#: (width multiplier, depth multiplier, ImageNet resolution, dropout before the classifier), as TensorFlow's
#: efficientnet_lite_builder.py defines them.
VARIANTS = {
    "efficientnet_lite0": (1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": (1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": (1.1, 1.2, 260, 0.3),
}
STEM_CHANNELS, HEAD_CHANNELS = 32, 1280
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's BatchNorm (its momentum 0.99 is PyTorch's 0.01)


@dataclass(frozen=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    channels: int


#: The seven stages of EfficientNet-B0/Lite0 (the first is a depthwise-separable block, the rest inverted residuals).
STAGES = (Stage(1, 3, 1, 1, 16), Stage(2, 3, 2, 6, 24), Stage(2, 5, 2, 6, 40), Stage(3, 3, 2, 6, 80),
          Stage(3, 5, 1, 6, 112), Stage(4, 5, 2, 6, 192), Stage(1, 3, 1, 6, 320))


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """TensorFlow's rounding of a widened channel count to a multiple of 8, never more than 10% below."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stage_repeats(index: int, repeats: int, depth: float) -> int:
    """Lite keeps the first and last stage at one block whatever the depth multiplier."""
    return repeats if index in (0, len(STAGES) - 1) else int(math.ceil(depth * repeats))


class SameConv2d(nn.Conv2d):
    """A convolution padded as TensorFlow's "SAME" does: symmetric where that is the same (stride 1, odd
    kernel), else computed from the input's size, the extra pixel on the right and bottom."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        symmetric = stride == 1
        super().__init__(in_channels, out_channels, kernel, stride, padding=kernel // 2 if symmetric else 0,
                         groups=groups, bias=False)
        self.same = not symmetric

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same:
            x = F.pad(x, _same_padding(x.shape[-2], x.shape[-1], self.kernel_size[0], self.stride[0]))
        return super().forward(x)


def _same_padding(height: int, width: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    def one(size: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    (top, bottom), (left, right) = one(height), one(width)
    return left, right, top, bottom


def batch_norm(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class DropPath(nn.Module):
    """Stochastic depth: while training, drop a residual branch for a whole sample with probability `rate`."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        keep = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(1 - self.rate)
        return x * keep / (1 - self.rate)


class DepthwiseSeparable(nn.Module):
    """Stage 1's block (expansion 1): depthwise conv, BN, ReLU6, pointwise conv, BN (timm: DepthwiseSeparableConv)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, drop: float) -> None:
        super().__init__()
        self.conv_dw = SameConv2d(in_channels, in_channels, kernel, stride, groups=in_channels)
        self.bn1 = batch_norm(in_channels)
        self.conv_pw = SameConv2d(in_channels, out_channels, 1)
        self.bn2 = batch_norm(out_channels)
        self.skip = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv_pw(F.relu6(self.bn1(self.conv_dw(x)))))
        return x + self.drop_path(out) if self.skip else out


class InvertedResidual(nn.Module):
    """MBConv: expand 1x1, BN, ReLU6, depthwise, BN, ReLU6, project 1x1, BN (timm: InvertedResidual)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int,
                 drop: float) -> None:
        super().__init__()
        middle = in_channels * expand
        self.conv_pw = SameConv2d(in_channels, middle, 1)
        self.bn1 = batch_norm(middle)
        self.conv_dw = SameConv2d(middle, middle, kernel, stride, groups=middle)
        self.bn2 = batch_norm(middle)
        self.conv_pwl = SameConv2d(middle, out_channels, 1)
        self.bn3 = batch_norm(out_channels)
        self.skip = stride == 1 and in_channels == out_channels
        self.drop_path = DropPath(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.conv_pw(x)))
        out = F.relu6(self.bn2(self.conv_dw(out)))
        out = self.bn3(self.conv_pwl(out))
        return x + self.drop_path(out) if self.skip else out


class EfficientNetLite(nn.Module):
    """The network on standardised float images: features (stem, 7 stages, head) -> pooled 1280 -> classifier."""

    def __init__(self, width: float, depth: float, num_classes: int = 1000, in_channels: int = 3,
                 dropout: float = 0.2, drop_path_rate: float = 0.0, resolution: int | None = None) -> None:
        super().__init__()
        #: Inputs are brought to what the ImageNet weights know before the stem: grayscale repeated to RGB, and
        #: resized (bilinear) to `resolution` x `resolution` when given. No parameters: timm's layout stays.
        self.repeat_gray = in_channels == 1
        self.resolution = resolution
        self.conv_stem = SameConv2d(3, STEM_CHANNELS, 3, 2)
        self.bn1 = batch_norm(STEM_CHANNELS)
        plan = [(index, stage, stage_repeats(index, stage.repeats, depth)) for index, stage in enumerate(STAGES)]
        total, done, channels = sum(repeats for *_, repeats in plan), 0, STEM_CHANNELS
        stages = []
        for index, stage, repeats in plan:
            out = round_channels(stage.channels, width)
            blocks = []
            for repeat in range(repeats):
                stride, drop = (stage.stride if repeat == 0 else 1), drop_path_rate * done / total
                blocks.append(DepthwiseSeparable(channels, out, stage.kernel, stride, drop) if stage.expand == 1
                              else InvertedResidual(channels, out, stage.kernel, stride, stage.expand, drop))
                channels, done = out, done + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = SameConv2d(channels, HEAD_CHANNELS, 1)
        self.bn2 = batch_norm(HEAD_CHANNELS)
        self.act2 = nn.ReLU6()  # a module, not F.relu6: the last feature map is its output, for a heatmap's hook
        self.num_features = HEAD_CHANNELS
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(HEAD_CHANNELS, num_classes)
        _init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (N, 1280, H/32, W/32): what a heatmap or a frozen-feature cache reads."""
        x = F.relu6(self.bn1(self.conv_stem(adapt_input(x, self.repeat_gray, self.resolution))))
        return self.act2(self.bn2(self.conv_head(self.blocks(x))))

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits of a feature map; its pooled vector (N, 1280) with `pre_logits`, as timm's models do."""
        pooled = features.mean((2, 3))
        return pooled if pre_logits else self.classifier(self.dropout(pooled))

    def head_module(self) -> nn.Module:
        """What follows the pooled vector (dropout, classifier), sharing this model's parameters: the part that
        trains on a frozen backbone's cached features (engine/features.py)."""
        return nn.Sequential(self.dropout, self.classifier)

    def stages(self) -> list[nn.Module]:
        """The backbone in input order, the stem first, then its 7 stages: what --freeze-stages counts."""
        return [nn.ModuleList([self.conv_stem, self.bn1]), *self.blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def adapt_input(x: torch.Tensor, repeat_gray: bool, resolution: int | None) -> torch.Tensor:
    """Images brought to what ImageNet weights know: grayscale repeated to RGB, resized (bilinear) to a square of
    `resolution` when given. No parameters, so a backbone's layout stays its source's."""
    if repeat_gray:
        x = x.expand(-1, 3, -1, -1)
    if resolution is not None and tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return x


def _init_weights(model: nn.Module) -> None:
    """TensorFlow EfficientNet's initialisation (used when no pretrained weights are loaded)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        elif isinstance(module, nn.Linear):
            # By fan-in (TensorFlow and timm use fan-out, 1/sqrt(classes)): with a few classes that bound is ~0.6,
            # and 1,280 ImageNet features then give a new head logits in the tens (a first loss of 5.5 for 3 classes).
            bound = 1.0 / math.sqrt(module.weight.shape[1])
            nn.init.uniform_(module.weight, -bound, bound)
            nn.init.zeros_(module.bias)


def efficientnet_lite(variant: str, input_shape: tuple[int, int, int], num_classes: int,
                      drop_path_rate: float = 0.0, resolution: int | None = None) -> EfficientNetLite:
    width, depth, _, dropout = VARIANTS[variant]
    if input_shape[0] not in (1, 3):
        raise ValueError(f"EfficientNet-Lite takes 1- or 3-channel images, not {input_shape[0]}")
    if resolution is not None and not 32 <= int(resolution) <= 1024:
        raise ValueError(f"resolution must be from 32 to 1024 pixels, got {resolution}")
    return EfficientNetLite(width, depth, num_classes, input_shape[0], dropout, drop_path_rate,
                            None if resolution is None else int(resolution))


def _register(variant: str) -> None:
    width, depth, size, _ = VARIANTS[variant]

    @register_model(variant, f"EfficientNet-Lite ({width}x width, {depth}x depth, ImageNet at {size}px; ReLU6, "
                             "no SE, TensorFlow padding); ImageNet weights: models/pretrained.py")
    def build(input_shape: tuple[int, int, int], num_classes: int, drop_path_rate: float = 0.0,
              resolution: int | None = None) -> nn.Module:
        return efficientnet_lite(variant, input_shape, num_classes, drop_path_rate, resolution)


for _variant in VARIANTS:
    _register(_variant)

"""Test-time augmentation: the model's logits averaged over a few fixed views of each image.

A wrapper nn.Module, so whatever runs a model (evaluate, predict, ONNX/TorchScript export, serve) runs
its TTA the same way. A run records its TTA in model.json and `runs.load_run` wraps the model with it.

Views (each a whole-batch tensor op, the same for every image):
- "flip": the image and its left-right mirror (2 views). Only for data whose mirror keeps the class.
- "shift": the image and its copies moved 1 px down-right and 1 px up-left, the edge reflected (3 views),
  as airbench's test-time translation: the net's answer no longer hangs on one pixel grid alignment.
- "flip-shift": every shift view and its mirror (6 views).
The logits (not probabilities) are averaged with equal weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import CnnkitError

TTA_CHOICES = ("none", "flip", "shift", "flip-shift")
#: (rows down, columns right) of the "shift" views, the identity first.
SHIFTS = ((0, 0), (1, 1), (-1, -1))


def shifted(images: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The batch moved `rows` px down and `cols` px right (at most 1), the border reflected from the image."""
    height, width = images.shape[-2:]
    padded = F.pad(images, (1, 1, 1, 1), mode="reflect")
    return padded[..., 1 - rows : 1 - rows + height, 1 - cols : 1 - cols + width]


def tta_views(images: torch.Tensor, views: str) -> list[torch.Tensor]:
    """The float batches a TTA of kind `views` averages over, the unchanged images first."""
    images = images.float()  # pixel units, as the classifier takes them; reflect padding needs floats
    shifts = SHIFTS if views in ("shift", "flip-shift") else SHIFTS[:1]
    batches = [images if (rows, cols) == (0, 0) else shifted(images, rows, cols) for rows, cols in shifts]
    if views in ("flip", "flip-shift"):
        batches += [batch.flip(-1) for batch in batches]
    return batches


class TestTimeAugmentation(nn.Module):
    """`model` whose forward returns the mean of its logits over the `views` of the input (see module doc).

    Takes what the model takes (uint8 or float images in pixel units, N x C x H x W). The wrapped model
    keeps its own state dict under `model.`; save the inner model, not the wrapper.
    """

    __test__ = False  # a class named Test* that pytest must not collect

    def __init__(self, model: nn.Module, views: str) -> None:
        super().__init__()
        if views not in TTA_CHOICES or views == "none":
            raise CnnkitError(f"test-time augmentation must be one of {', '.join(TTA_CHOICES[1:])}, got {views!r}")
        self.model = model
        self.views = views

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = [self.model(batch) for batch in tta_views(images, self.views)]
        return torch.stack(logits).mean(0)

    def extra_repr(self) -> str:
        return f"views={self.views!r}"


def with_tta(model: nn.Module, views: str) -> nn.Module:
    """`model` wrapped in its test-time augmentation, or itself for "none"."""
    return model if views == "none" else TestTimeAugmentation(model, views)


def check_tta(views: str, mirror_ok: bool, flip: bool, where: str) -> None:
    """Refuse a mirroring TTA where mirrored images are not of their class, unless training mirrored them.

    `mirror_ok`: the dataset's property; `flip`: whether training mirrored (flip=yes forces it for digits,
    and then the model has learnt mirrored digits). `where` names the run or dataset in the message.
    """
    if views not in TTA_CHOICES:
        raise CnnkitError(f"tta must be one of {', '.join(TTA_CHOICES)}, got {views!r}")
    if "flip" in views and not (mirror_ok or flip):
        raise CnnkitError(f"tta {views} mirrors images, but {where} is not mirror-safe (digits or characters) and "
                          f"was not trained with flip; use tta shift or none, or train with flip yes")

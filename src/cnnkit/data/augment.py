"""Batch augmentations as whole-batch tensor ops on the training device (no per-image Python).

`--augment` is a pipeline: a comma-separated list of items `name` or `name=value` (`crop=4,erase=0.5`),
applied in that order to every training batch. Each name is one registered factory `(value or None) ->
Augmentation`, where an Augmentation maps a uint8 batch (N, C, H, W) and a CPU torch.Generator to a uint8
batch of the same shape. Randomness is drawn on the CPU generator (so one seed gives the same batches on
any device) and only the drawn numbers are moved to the images' device.

Horizontal flipping is not an item: whether mirroring keeps a class depends on the dataset (a mirrored
digit is not a digit), so it is the `flip` option, resolved against the dataset (`resolve_flip`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from cnnkit.errors import CnnkitError
from cnnkit.registry import Registry, did_you_mean

Augmentation = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
AugmentationFactory = Callable[[float | None], Augmentation]
AUGMENTATIONS: Registry[AugmentationFactory] = Registry("augmentation")

#: The most pixels a translation or crop may move an image: beyond it the image is mostly border.
MAX_PIXELS = 64
#: Scale range of `affine` (each image's own zoom, uniform in it).
AFFINE_SCALE = (0.9, 1.1)


# ---------------------------------------------------------------------------------------------------------
# The batch operations (usable on their own; the registered items below configure them)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def translate(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, border: str = "zero") -> torch.Tensor:
    """Each image moved down by `rows[i]` and right by `cols[i]` pixels (integer tensors of length N).

    `border` fills what enters the frame: "zero" (black) or "reflect" (the image mirrored at its edge,
    without repeating the edge pixel, as numpy's and torch's reflect padding). One gather: the cost is a copy.
    """
    n, channels, height, width = images.shape
    device = images.device
    source_rows = torch.arange(height, device=device).view(1, -1) - rows.to(device).view(-1, 1)  # (N, H)
    source_cols = torch.arange(width, device=device).view(1, -1) - cols.to(device).view(-1, 1)  # (N, W)
    if border == "reflect":
        source_rows, source_cols = _reflect(source_rows, height), _reflect(source_cols, width)
    else:
        inside_rows = (source_rows >= 0) & (source_rows < height)
        inside_cols = (source_cols >= 0) & (source_cols < width)
        source_rows, source_cols = source_rows.clamp(0, height - 1), source_cols.clamp(0, width - 1)
    batch = torch.arange(n, device=device).view(-1, 1, 1, 1)
    channel = torch.arange(channels, device=device).view(1, -1, 1, 1)
    moved = images[batch, channel, source_rows.view(n, 1, height, 1), source_cols.view(n, 1, 1, width)]
    if border == "reflect":
        return moved
    inside = inside_rows.view(n, 1, height, 1) & inside_cols.view(n, 1, 1, width)
    return moved * inside.to(images.dtype)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Indices outside [0, size) mirrored back in (one bounce: the shift must be below `size`)."""
    index = index.abs()
    return torch.where(index > size - 1, 2 * (size - 1) - index, index)


def _random_offsets(n: int, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """(2, N) integer offsets uniform in [-max_shift, max_shift]: rows, then columns."""
    return torch.randint(-max_shift, max_shift + 1, (2, n), generator=generator)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift], zero-filling the border."""
    offsets = _random_offsets(len(images), max_shift, generator)
    return translate(images, offsets[0], offsets[1], "zero")


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Pad each side by `padding` pixels with reflection, then crop the original size at a random place.

    The same as a random translation in [-padding, padding] with the border reflected, computed without
    building the padded batch.
    """
    _, _, height, width = images.shape
    if padding >= min(height, width):
        raise CnnkitError(f"augment crop={padding} needs images larger than {padding} px, got {height}x{width}; "
                          f"use a smaller crop")
    offsets = _random_offsets(len(images), padding, generator)
    return translate(images, offsets[0], offsets[1], "reflect")


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right (for natural images, never for digits)."""
    flip = (torch.rand(len(images), generator=generator) < 0.5).to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(3), images)


def erase_side(size: float, height: int, width: int) -> int:
    """The erased square's side in pixels: `size` pixels, or that fraction of the shorter side when below 1."""
    side = max(1, round(size * min(height, width))) if size < 1 else int(size)
    if side > min(height, width):
        raise CnnkitError(f"augment erase={size:g} asks for a {side} px square, larger than the "
                          f"{height}x{width} images; use at most {min(height, width)} or a fraction below 1")
    return side


def random_erase(images: torch.Tensor, size: float, generator: torch.Generator) -> torch.Tensor:
    """Fill one square per image, at a random place wholly inside it, with that image's mean colour.

    `size`: the side in pixels, or a fraction (< 1) of the shorter side. The mean (per channel, per image)
    rather than black keeps the batch statistics, as cutout's zero does on standardised inputs.
    """
    n, _, height, width = images.shape
    side = erase_side(size, height, width)
    top = torch.randint(0, height - side + 1, (n,), generator=generator).to(images.device).view(-1, 1, 1, 1)
    left = torch.randint(0, width - side + 1, (n,), generator=generator).to(images.device).view(-1, 1, 1, 1)
    rows = torch.arange(height, device=images.device).view(1, 1, -1, 1)
    cols = torch.arange(width, device=images.device).view(1, 1, 1, -1)
    square = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side)
    mean = images.float().mean(dim=(2, 3), keepdim=True).round().to(images.dtype)
    return torch.where(square, mean, images)


def random_affine(images: torch.Tensor, max_degrees: float, generator: torch.Generator,
                  scale: tuple[float, float] = AFFINE_SCALE) -> torch.Tensor:
    """Rotate each image by its own angle in [-max_degrees, max_degrees] and zoom it by a factor in `scale`.

    About the image centre, bilinear, zero outside; uint8 in and out. The matrix is corrected for the
    aspect ratio (affine_grid works in coordinates normalised per axis), so a rotation stays a rotation on
    non-square images.
    """
    n, _, height, width = images.shape
    angle = torch.deg2rad(_uniform(n, -max_degrees, max_degrees, generator))
    zoom = _uniform(n, scale[0], scale[1], generator)
    # The grid maps output pixels to input pixels: the inverse transform, a rotation by -angle over zoom.
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, sin * height / width, zeros], 1),
                         torch.stack([-sin * width / height, cos, zeros], 1)], 1)
    return _resample(images, theta, "zeros")


def _resample(images: torch.Tensor, theta: torch.Tensor, border: str) -> torch.Tensor:
    """The uint8 batch resampled bilinearly through per-image affine maps `theta` (N, 2, 3), from output to input
    pixels in affine_grid's normalised coordinates; `border` is grid_sample's padding mode."""
    grid = F.affine_grid(theta.float().to(images.device), list(images.shape), align_corners=False)
    warped = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode=border, align_corners=False)
    return warped.round_().clamp_(0, 255).to(images.dtype)


#: Aspect ratios (width over height) a `zoom` crop draws from, log-uniformly: the Inception / timm default.
ZOOM_ASPECT = (3 / 4, 4 / 3)


def random_zoom(images: torch.Tensor, min_area: float, generator: torch.Generator,
                aspect: tuple[float, float] = ZOOM_ASPECT) -> torch.Tensor:
    """Random-resized crop: each image's own rectangle, stretched back to the full frame (bilinear, uint8).

    The rectangle covers a fraction of the image's area uniform in [min_area, 1], with a width-to-height ratio
    log-uniform in `aspect`, at a uniform place wholly inside the image; a side that would leave the image is
    cut to the image's (so a thin draw covers a little less than its area). Unlike `crop`'s shifts, the object's
    apparent size changes, as in ImageNet training recipes (on 32-px CIFAR photos it measured worse than `crop`
    for transfer-best: benchmarks/RESULTS.md).
    """
    n = len(images)
    area = _uniform(n, min_area, 1.0, generator)
    ratio = torch.exp(_uniform(n, math.log(aspect[0]), math.log(aspect[1]), generator))
    crop_width = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the side
    crop_height = torch.sqrt(area / ratio).clamp(max=1.0)
    # affine_grid's coordinates span [-1, 1]: a crop of fraction w has its centre within +-(1 - w).
    centre_x = (1 - crop_width) * _uniform(n, -1.0, 1.0, generator)
    centre_y = (1 - crop_height) * _uniform(n, -1.0, 1.0, generator)
    zeros = torch.zeros_like(area)
    theta = torch.stack([torch.stack([crop_width, zeros, centre_x], 1),
                         torch.stack([zeros, crop_height, centre_y], 1)], 1)
    return _resample(images, theta, "border")


# ---------------------------------------------------------------------------------------------------------
# The registered items: `name` or `name=value` in --augment


def _pixels(value: float | None, default: int) -> int:
    """A whole number of pixels from 1 to MAX_PIXELS (ValueError with the allowed range otherwise)."""
    if value is None:
        return default
    if value != int(value) or not 1 <= value <= MAX_PIXELS:
        raise ValueError(f"must be a whole number of pixels from 1 to {MAX_PIXELS}, got {value:g}")
    return int(value)


@AUGMENTATIONS.register("none")
def no_augmentation(value: float | None) -> Augmentation:
    """No augmentation: the default, and what a huge dataset or a short budget wants."""
    if value is not None:
        raise ValueError("takes no value")
    return lambda images, generator: images


@AUGMENTATIONS.register("shift")
def shift(value: float | None) -> Augmentation:
    """shift=P (default 2): translate by up to ±P px, zero fill. For digits: black enters the black border
    (MNIST's 4-px margin leaves room), so a shifted digit is still a clean digit."""
    pixels = _pixels(value, 2)
    return lambda images, generator: random_shift(images, pixels, generator)


@AUGMENTATIONS.register("crop")
def crop(value: float | None) -> Augmentation:
    """crop=P (default 4): pad P px by reflection and crop at a random place, the CIFAR recipe (4 for
    ResNets; airbench translates by 2). For photos: a reflected border looks like more scene, not a frame."""
    pixels = _pixels(value, 4)
    return lambda images, generator: random_crop(images, pixels, generator)


@AUGMENTATIONS.register("erase")
def erase(value: float | None) -> Augmentation:
    """erase=S (default 0.5): cutout / random erasing, one S-px square (a fraction of the side if S < 1)
    per image. Makes the net use all of an object, not its one most telling part (Fashion-MNIST, CIFAR)."""
    size = 0.5 if value is None else value
    if not (0 < size < 1 or (size >= 1 and size == int(size) and size <= 1024)):
        raise ValueError(f"must be a fraction of the side between 0 and 1 or a whole number of pixels from 1 "
                         f"to 1024, got {size:g}")
    return lambda images, generator: random_erase(images, size, generator)


@AUGMENTATIONS.register("zoom")
def zoom(value: float | None) -> Augmentation:
    """zoom=A (default 0.35): random-resized crop, a rectangle of A to all of the image's area (aspect 3:4 to
    4:3) stretched to the full frame. For photos, where an object's size and place in the frame vary (timm's and
    torchvision's RandomResizedCrop with scale=(A, 1))."""
    min_area = 0.35 if value is None else value
    if not 0 < min_area <= 1:
        raise ValueError(f"must be the smallest fraction of the image's area to keep, above 0 and at most 1, "
                         f"got {min_area:g}")
    return lambda images, generator: random_zoom(images, min_area, generator)


@AUGMENTATIONS.register("affine")
def affine(value: float | None) -> Augmentation:
    """affine=D (default 10): rotate within ±D degrees and zoom 0.9-1.1 per image. For handwriting, whose
    slant and size vary from writer to writer; costs a float resample of the batch."""
    degrees = 10.0 if value is None else value
    if not 0 <= degrees <= 180:
        raise ValueError(f"must be a rotation in degrees from 0 to 180, got {degrees:g}")
    return lambda images, generator: random_affine(images, degrees, generator)


# ---------------------------------------------------------------------------------------------------------
# Pipelines


def parse_pipeline(text: str) -> list[tuple[str, float | None]]:
    """'crop=4,erase=0.5' -> [('crop', 4.0), ('erase', 0.5)]; ValueError naming the bad item and the fix."""
    items: list[tuple[str, float | None]] = []
    for raw in str(text).split(","):
        item = raw.strip().lower()
        if not item:
            raise ValueError(f"has an empty item in {text!r}; write items separated by single commas, "
                             f"e.g. crop=4,erase=0.5")
        name, has_value, value_text = (part.strip() for part in item.partition("="))
        if name not in AUGMENTATIONS:
            raise ValueError(f"has an unknown item {name!r}{did_you_mean(name, AUGMENTATIONS.names())}; "
                             f"known: {', '.join(AUGMENTATIONS.names())}")
        value = None
        if has_value:
            try:
                value = float(value_text)
            except ValueError:
                raise ValueError(f"item {item!r}: {value_text!r} is not a number") from None
            if not math.isfinite(value):
                raise ValueError(f"item {item!r}: the value must be a finite number")
        items.append((name, value))
    if len(items) > 1 and any(name == "none" for name, _ in items):
        raise ValueError(f"combines 'none' with other items in {text!r}; use none alone or leave it out")
    return items


def build_pipeline(items: Sequence[tuple[str, float | None]]) -> Augmentation:
    """The items' augmentations applied one after the other (ValueError from an item's factory)."""
    steps = []
    for name, value in items:
        try:
            steps.append(AUGMENTATIONS.get(name)(value))
        except ValueError as error:
            raise ValueError(f"item {name}{'' if value is None else f'={value:g}'}: {error}") from None

    def pipeline(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for step in steps:
            images = step(images, generator)
        return images

    return pipeline


def make_augmentation(text: str) -> Augmentation:
    """The Augmentation an --augment value names (CnnkitError when it names none)."""
    try:
        return build_pipeline(parse_pipeline(text))
    except ValueError as error:
        raise CnnkitError(f"augment {error}") from None


def check_pipeline(text: str) -> str | None:
    """The schema's rule for `augment`: what is wrong with the pipeline, or None."""
    try:
        build_pipeline(parse_pipeline(text))
    except ValueError as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------------------------------------
# Flip: an option resolved against the dataset

FLIP_CHOICES = ("auto", "yes", "no")


def resolve_flip(choice: str, mirror_ok: bool) -> bool:
    """Whether training mirrors half of each batch: `auto` asks the dataset, `yes`/`no` are the user's say.

    `yes` mirrors even digits: the user's explicit choice (e.g. a digit set where mirrored writing occurs).
    """
    if choice not in FLIP_CHOICES:
        raise CnnkitError(f"flip must be one of {', '.join(FLIP_CHOICES)}, got {choice!r}")
    return mirror_ok if choice == "auto" else choice == "yes"


def training_augmentation(augment: str, flip: bool) -> Augmentation:
    """What fit() applies to each batch: a random mirror of half of it when `flip`, then the --augment items."""
    pipeline = make_augmentation(augment)
    if not flip:
        return pipeline
    return lambda images, generator: pipeline(random_flip(images, generator), generator)

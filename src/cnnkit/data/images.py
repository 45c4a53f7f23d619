"""The one image decoder: file -> uint8 (channels, height, width), used by image folders and by prediction.

A model only works on new images preprocessed exactly as its training images were decoded: the same EXIF
orientation, the same mode conversion (16-bit scaled, transparency on white), the same bilinear resize.
Keeping that in one function, rather than one copy for datasets and another for prediction, means the
two cannot drift apart. The extension list lives here for the same reason: a folder dataset and
`cnnkit predict DIR` accept exactly the same files.

It is also the one image policy (`open_image`) for training, evaluation, prediction and the server: only
formats Pillow decodes in-process are identified (a file named x.png that is really EPS would otherwise make
Pillow run Ghostscript from PATH), and an image over the pixel cap is refused from its header, before any
pixel is decoded.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import struct
import sys
from typing import BinaryIO, NamedTuple

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ALLOWED_FORMATS", "DECODE_ERRORS", "GRAYSCALE_MODES", "IMAGE_EXTENSIONS", "FoundImage", "ImageRefused",
           "Probe", "decode_image", "hidden_name", "max_pixels", "open_image", "probe", "not_a_file", "set_max_pixels",
           "to_array", "walk_images"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
#: The Pillow formats cnnkit opens: those its extensions name, each decoded by Pillow's own C code (MPO is a
#: phone camera's JPEG). EPS, PS and PDF are not among them: Pillow hands those to an external program.
ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "WEBP", "TIFF")
#: What Pillow raises on a damaged or hostile file, beyond OSError and ValueError: a malformed header reaches
#: Python code that meets a value of the wrong kind (a TIFF whose StripOffsets is a rational raised TypeError
#: in the server, found by the property tests), a short table (IndexError, KeyError, struct.error, EOFError)
#: or a nonsense size (ZeroDivisionError, OverflowError). Every reader of images catches exactly these.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, TypeError, IndexError, KeyError, struct.error,
                 ZeroDivisionError, OverflowError, Image.DecompressionBombError)
#: The default pixel cap (width x height, as stored): more than any phone photo, and a 16-bit image this size
#: still converts in ~0.3 GB. Pillow's own bomb check starts at 89 MP (a warning) and refuses at 179 MP.
MAX_PIXELS = 64_000_000
#: The cap travels to spawned decoding workers through the environment (a module global would not).
PIXELS_ENV = "CNNKIT_MAX_PIXELS"
_max_pixels = int(os.environ[PIXELS_ENV]) if os.environ.get(PIXELS_ENV, "").isdigit() else MAX_PIXELS


class ImageRefused(ValueError):
    """An image the policy does not open: a format outside ALLOWED_FORMATS or more pixels than the cap."""


@functools.cache
def _registered_formats() -> tuple[str, ...]:
    """ALLOWED_FORMATS that this Pillow has (a build without WebP lacks one); plugins registered first."""
    Image.init()
    return tuple(name for name in ALLOWED_FORMATS if name in Image.OPEN)


def set_max_pixels(pixels: int) -> None:
    """Change the pixel cap of this process (the CLI's --max-megapixels)."""
    global _max_pixels
    if pixels < 1:
        raise ValueError("the pixel cap must be at least 1 pixel")
    _max_pixels = int(pixels)
    os.environ[PIXELS_ENV] = str(_max_pixels)


def max_pixels() -> int:
    return _max_pixels


def open_image(source: str | os.PathLike[str] | BinaryIO) -> Image.Image:
    """Open an image under the one policy: an allowed format, at most `max_pixels()` pixels (checked from the
    header; nothing decoded yet). Raises ImageRefused, or Pillow's own errors for unreadable files."""
    image = Image.open(source, formats=_registered_formats())
    width, height = image.size
    if width * height > _max_pixels:
        image.close()
        raise ImageRefused(f"{width}x{height} is {width * height / 1e6:.1f} megapixels, over the cap of "
                           f"{_max_pixels / 1e6:g}; shrink it, or raise the cap with --max-megapixels")
    return image
#: Pillow modes with one channel of information: a folder of only these decodes to 1 channel by default.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_EXIF_ORIENTATION = 0x0112
Probe = tuple[tuple[int, int], str]  # ((width, height) as displayed, Pillow mode)


class FoundImage(NamedTuple):
    """One image-named entry found below a folder: a readable regular file, or `problem` says why not."""

    relpath: str  # posix path relative to the folder walked, prefixed by walk_images' `relative`
    path: str
    size: int  # -1 when `problem` is set
    mtime_ns: int
    problem: str | None = None


def hidden_name(name: str) -> bool:
    """True for names a user never meant as data: dot files and the __MACOSX folder zip tools add."""
    return name.startswith(".") or name == "__MACOSX"


def walk_images(folder: str, relative: str = "") -> list[FoundImage]:
    """Every visible image-named entry below `folder` (recursively, by extension), sorted by relpath.

    One bad entry never stops the walk, so a folder dataset and `cnnkit predict DIR` can skip and name it
    and go on with the rest: an image-named entry that is no readable regular file (a symlink loop, a
    dangling link, a FIFO that would block a reader forever, a link to a folder) and a subfolder that
    cannot be listed come back with `problem` set. Symlinked folders are not entered (no cycles); plain
    strings and os.scandir rather than pathlib, since for 50k files pathlib's parsing alone took 0.8 s.
    """
    found: list[FoundImage] = []
    pending = [(folder, relative)]
    while pending:
        directory, rel = pending.pop()
        try:
            with os.scandir(directory) as listing:
                items = list(listing)
        except OSError as error:
            found.append(FoundImage(f"{rel}/" if rel else "./", directory, -1, 0,
                                    f"cannot list this folder ({error.strerror or error})"))
            continue
        for item in items:
            if hidden_name(item.name):
                continue
            name = f"{rel}/{item.name}" if rel else item.name
            if _real_dir(item):
                pending.append((item.path, name))
            elif os.path.splitext(item.name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(_found_file(item, name))
    found.sort()
    return found


def _real_dir(item: os.DirEntry) -> bool:
    try:
        return item.is_dir(follow_symlinks=False)
    except OSError:
        return False


def _found_file(item: os.DirEntry, relpath: str) -> FoundImage:
    """The entry as a FoundImage: its size and mtime, or why it cannot be read as an image file."""
    try:
        info = item.stat()  # follows a symlink to its target
    except OSError as error:
        reason = "is a symlink loop" if error.errno == errno.ELOOP else (
            "is a dangling symlink" if item.is_symlink() else f"cannot be read ({error.strerror or error})")
        return FoundImage(relpath, item.path, -1, 0, reason)
    problem = not_a_file(info.st_mode)
    if problem is not None:
        return FoundImage(relpath, item.path, -1, 0, problem)
    return FoundImage(relpath, item.path, info.st_size, info.st_mtime_ns)


def not_a_file(mode: int) -> str | None:
    """Why an entry of this st_mode is no image file to open (None for a regular file): a reader would
    fail on a folder and wait forever on a FIFO."""
    if stat.S_ISREG(mode):
        return None
    return "is a folder" if stat.S_ISDIR(mode) else "is not a regular file (a FIFO, socket or device)"


def decode_image(
    source: str | os.PathLike[str] | BinaryIO | Image.Image, image_size: tuple[int, int], channels: int
) -> np.ndarray:
    """Decode one image to uint8 (channels, height, width) exactly as folder datasets are decoded.

    Public so prediction can preprocess a user's image the same way the training images were.
    """
    if isinstance(source, Image.Image):
        return to_array(source, image_size, channels)
    with open_image(source) as image:
        return to_array(image, image_size, channels)


def decode_within(
    source: str | os.PathLike[str] | BinaryIO | Image.Image, max_side: int, channels: int
) -> np.ndarray:
    """Decode one image keeping its aspect ratio, shrunk (never enlarged) to at most `max_side` pixels.

    For preprocessing that needs the whole picture rather than the model's input size (finding a digit's
    ink in a photo); JPEGs decode at a reduced scale, so a phone photo costs little.
    """
    def decode(image: Image.Image) -> np.ndarray:
        (width, height), _ = probe(image)
        scale = min(1.0, max_side / max(width, height, 1))
        return to_array(image, (max(1, round(height * scale)), max(1, round(width * scale))), channels)

    if isinstance(source, Image.Image):
        return decode(source)
    with open_image(source) as image:
        return decode(image)


def probe(image: Image.Image) -> Probe:
    """((width, height) as displayed, i.e. after EXIF rotation, mode) of an opened image."""
    width, height = image.size
    if _orientation(image) in (5, 6, 7, 8):  # rotated by 90 degrees: width and height swap
        width, height = height, width
    return (width, height), image.mode


def to_array(image: Image.Image, image_size: tuple[int, int], channels: int) -> np.ndarray:
    """Orient, convert and resize one opened image to uint8 (channels, height, width)."""
    height, width = image_size
    orientation = _orientation(image)
    if image.format == "JPEG":
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the target is much smaller: big photos decode
        # several times faster and the following antialiased resize gives the same quality.
        draft_size = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        image.draft("L" if channels == 1 else None, draft_size)
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
    image = _to_mode(image, "L" if channels == 1 else "RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def to_image(array: np.ndarray) -> Image.Image:
    """The Pillow image of uint8 (C, H, W) pixels, grayscale or RGB: to_array's inverse, for writing them out."""
    return Image.fromarray(np.ascontiguousarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0)))


def _orientation(image: Image.Image) -> int | None:
    """The EXIF orientation tag, read only for formats that carry EXIF (cheap for the rest)."""
    if image.format not in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") or not (
        "exif" in image.info or image.format == "TIFF"
    ):
        return None
    return image.getexif().get(_EXIF_ORIENTATION)


def _high_bytes(values: np.ndarray) -> np.ndarray:
    """16-bit pixel values to 8 bits (the high byte): a view of the high bytes for uint16, no wider copy."""
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:
        little = values.dtype.byteorder == "<" or (values.dtype.byteorder == "=" and sys.byteorder == "little")
        return np.ascontiguousarray(values.view(np.uint8)[..., 1::2] if little else values.view(np.uint8)[..., 0::2])
    # mode "I" (int32 holding 16-bit values): clipped to that range, shifted, in 32 bits
    return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)


def _to_mode(image: Image.Image, target: str) -> Image.Image:
    """Convert to "L" or "RGB": 16-bit and float grayscale scaled to 8 bits, transparency put on white."""
    if image.mode.startswith("I"):
        # 16-bit PNG / TIFF: Pillow's convert("L") would clip everything above 255 to white. Shifted in the
        # image's own integer type: widening a 64-MP image to int64 first took 1.2 GB.
        image = Image.fromarray(_high_bytes(np.asarray(image)), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image if image.mode == target else image.convert(target)

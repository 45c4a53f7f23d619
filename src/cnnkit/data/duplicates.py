"""Finding the same image twice: pixel digests for exact copies, perceptual hashes for near ones.

Here rather than in `cnnkit.audit` because training uses the exact half too: a test image whose pixels are
also in the training set makes the test accuracy partly a memory test, and training says so in one line.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["aligned_correlation", "close_hash_pairs", "copies_across", "perceptual_hashes", "pixel_digests"]


def pixel_digests(images: torch.Tensor) -> list[bytes]:
    """SHA-256 of each image's decoded pixels: equal digests are the same image, whatever the files' bytes."""
    flat = images.flatten(1).numpy()
    return [hashlib.sha256(row.tobytes()).digest() for row in flat]


def copies_across(train: torch.Tensor, test: torch.Tensor) -> int:
    """How many test images have a pixel-identical copy among the training images."""
    seen = set(pixel_digests(train))
    return sum(digest in seen for digest in pixel_digests(test))


#: One-pixel shifts (dy, dx) an image is also hashed at: a pHash moves 8-16 bits (of 64) when a 32x32 photo
#: shifts by one pixel, so a shifted copy is found by comparing its hash with the shifted hashes of the other.
SHIFTS = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0), (1, 1), (1, -1), (-1, 1), (-1, -1))


def _shifted(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """(H, W[, C]) moved by (dy, dx) pixels, the edge rows and columns repeated into the gap."""
    height, width = image.shape[:2]
    rows = np.clip(np.arange(height) - dy, 0, height - 1)
    columns = np.clip(np.arange(width) - dx, 0, width - 1)
    return image[rows][:, columns]


def _picture(image: np.ndarray) -> np.ndarray:
    """uint8 (C, H, W) as (H, W) or (H, W, C), as Pillow takes it."""
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def perceptual_hashes(images: torch.Tensor) -> np.ndarray:
    """(N, len(SHIFTS)) 64-bit pHashes (the imagehash package) of each uint8 (C, H, W) image at each shift of
    SHIFTS, as uint64; column 0 is the image itself."""
    import imagehash
    from PIL import Image

    hashes = np.empty((len(images), len(SHIFTS)), np.uint64)
    for index, image in enumerate(images.numpy()):
        picture = _picture(image)
        for column, (dy, dx) in enumerate(SHIFTS):
            bits = imagehash.phash(Image.fromarray(_shifted(picture, dy, dx))).hash.flatten()
            hashes[index, column] = np.packbits(bits).view(">u8")[0]
    return hashes


def close_hash_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 256) -> dict[tuple[int, int], int]:
    """{(i, j): bits that differ} for every i < j where some shifted hash of i is within `max_distance` bits of
    j's own hash (or the other way round); a chunk of rows against all at a time, one shift at a time (memory:
    chunk x N x 9 bytes, 140 MB for 60,000 images)."""
    own = hashes[:, 0]
    found: dict[tuple[int, int], int] = {}
    for start in range(0, len(hashes), chunk):
        rows = hashes[start : start + chunk]
        distances = np.full((len(rows), len(own)), 64, np.uint8)
        for shift in range(rows.shape[1]):
            np.minimum(distances, np.bitwise_count(rows[:, shift, None] ^ own[None, :]), out=distances)
        for a, b in zip(*np.nonzero(distances <= max_distance)):
            first, second = start + int(a), int(b)
            if first != second:
                key = (min(first, second), max(first, second))
                found[key] = min(found.get(key, 64), int(distances[a, b]))
    return found


def aligned_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson correlation of two uint8 (C, H, W) images' grey levels, at the best of the one-pixel shifts, the
    border left out: the pixel check a hash match must pass to be called a near-copy. A correlation rather than
    a mean difference: on dark-background images (digits) different images differ in few pixels, so a mean
    difference calls them alike."""
    grey = [image.astype(np.float64).mean(axis=0) for image in (first, second)]
    target = grey[1][1:-1, 1:-1].ravel()
    target = target - target.mean()
    best = -1.0
    for dy, dx in SHIFTS:
        moved = _shifted(grey[0], dy, dx)[1:-1, 1:-1].ravel()
        moved = moved - moved.mean()
        scale = float(np.linalg.norm(moved) * np.linalg.norm(target))
        best = max(best, float(moved @ target) / scale if scale > 0 else float(np.array_equal(moved, target)))
    return best

"""A dataset's images as PNG files in class folders: to look at, to try `cnnkit predict` on, or to start an
`imagefolder:` dataset from (the layout is exactly what image folders read).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from cnnkit.data.images import to_image
from cnnkit.errors import CnnkitError
from cnnkit.fileio import current_umask


def write_samples(images: np.ndarray, labels: np.ndarray, classes: list[str], folder: str | os.PathLike[str],
                  prefix: str) -> Path:
    """Write uint8 (N, C, H, W) images as `folder/<class>/<prefix>-<i>.png`; the folder appears whole or not at all.

    Class names are used as folder names, with '/' (Fashion-MNIST's "T-shirt/top") replaced by '-'.
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise CnnkitError(f"{folder}: already exists and is not an empty folder; choose a new folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        for index, (image, label) in enumerate(zip(images, labels)):
            target = staging / classes[int(label)].replace("/", "-") / f"{prefix}-{index:05d}.png"
            target.parent.mkdir(exist_ok=True)
            to_image(image).save(target)
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes 0700
        if folder.exists():
            folder.rmdir()  # the empty folder the user named
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder

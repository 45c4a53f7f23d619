"""Why a model decided: Grad-CAM maps (cnnkit.explain, `cnnkit predict --explain`) of a real trained run."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
from processes import run_cnnkit
from slices import SHARED_DATA


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("explain")
    data = root / "data"
    data.mkdir()
    (data / "mnist").symlink_to(SHARED_DATA / "mnist")
    result = run_cnnkit("train", "--data-dir", str(data), "--limit-train",
                        "4000", "--limit-eval", "500", "--epochs", "2", "--model", "seed", "--quiet",
                        "--no-checkpoint", "--runs-dir", str(root / "runs"), "--name", "s", timeout=600)
    assert result.returncode == 0, result.stderr
    return root / "runs" / "s", data


def test_explain_gives_a_map_per_image_that_follows_the_weights_and_the_class(run):
    run_dir, data = run
    loaded = cnnkit.load_run(run_dir)
    images = cnnkit.load_dataset("mnist", str(data), limit_eval=16, progress=False).test.images
    maps = cnnkit.explain(loaded.model, images)
    assert maps.shape == (16, 28, 28) and maps.dtype == np.float32
    assert maps.min() >= 0 and np.allclose(maps.reshape(16, -1).max(1)[maps.reshape(16, -1).max(1) > 0], 1.0)
    assert np.array_equal(maps, cnnkit.explain(loaded.model, images))  # the same model and images, the same maps
    from cnnkit.models.tta import with_tta

    assert np.array_equal(maps, cnnkit.explain(with_tta(loaded.model, "flip"), images))  # the image, not its mirror
    predicted = cnnkit.predict(loaded.model, images).argmax(1)
    other = [(int(label) + 1) % 10 for label in predicted]
    assert np.abs(cnnkit.explain(loaded.model, images, other) - maps).mean() > 0.05  # another class, other evidence
    # The model-randomisation check (Adebayo et al., 2018): maps of the same network with fresh weights differ.
    fresh = cnnkit.build_model("seed", (1, 28, 28), 10, seed=1)
    assert np.abs(cnnkit.explain(fresh, images) - maps).mean() > 0.1


def test_predict_explain_writes_a_heatmap_picture_per_image_and_refuses_a_run_directory(run, tmp_path):
    run_dir, data = run
    digits = tmp_path / "digits"
    sampled = run_cnnkit("datasets", "sample", "mnist", str(digits),
                         "--data-dir", str(data), "--count", "6", timeout=120)
    assert sampled.returncode == 0, sampled.stderr
    why = tmp_path / "why"
    result = run_cnnkit("predict", str(run_dir), str(digits), "--explain",
                        str(why), timeout=300)
    assert result.returncode == 0, result.stderr
    pictures = sorted(why.iterdir())
    assert len(pictures) == 6 == len(result.stdout.splitlines())
    with Image.open(pictures[0]) as picture:
        assert picture.format == "PNG" and picture.size == (224, 244)
        heat = np.asarray(picture.convert("RGB"))[20:].astype(int)
    assert (heat[..., 0] - heat[..., 2]).std() > 10  # a coloured map over the digit, not a plain copy of it
    refused = run_cnnkit("predict", str(run_dir), str(digits), "--explain",
                         str(run_dir), timeout=300)
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode != 0 and len(lines) == 1 and "--explain" in lines[0] and "is a run directory" in lines[0]


def test_a_run_shows_its_most_confident_errors_with_heatmaps_in_its_report(run):
    run_dir, _ = run
    with Image.open(run_dir / "errors_why.png") as sheet:
        assert sheet.format == "PNG" and sheet.size[0] >= 164 and sheet.size[1] % 184 == 0
        pixels = np.asarray(sheet.convert("RGB")).astype(int)
    assert (pixels[..., 0] - pixels[..., 2]).std() > 10  # heatmaps, not grey copies of the digits
    page = (run_dir / "report.html").read_text()
    assert page.index("errors.png") < page.index("errors_why.png")  # captioned, after the plain errors
    assert "evidence for the wrong answer" in page


def test_predict_explain_class_and_layer_are_checked_and_change_the_maps(run, tmp_path):
    run_dir, data = run
    digits = tmp_path / "digits"
    run_cnnkit("datasets", "sample", "mnist", str(digits), "--data-dir",
               str(data), "--count", "3", timeout=120, check=True)

    def predict(*options: str) -> subprocess.CompletedProcess:
        return run_cnnkit("predict", str(run_dir), str(digits), *options, timeout=300)

    pictures = {}
    for name, options in (("own", ()), ("seven", ("--explain-class", "7")), ("early", ("--explain-layer", "body.1"))):
        result = predict("--explain", str(tmp_path / name), *options)
        assert result.returncode == 0, result.stderr
        pictures[name] = [np.asarray(Image.open(path).convert("RGB"))[20:].astype(int)
                          for path in sorted((tmp_path / name).iterdir())]
    for other in ("seven", "early"):
        assert any(np.abs(a - b).mean() > 1 for a, b in zip(pictures["own"], pictures[other])), other
    for options, words in ((("--explain-class", "seven"), "not a class of this run"),
                           (("--explain-layer", "body.99"), "no layer of that name"),
                           (("--explain-layer", "body"), "gives no spatial feature map"),
                           (("--explain-class", "7"), "go with --explain DIR")):
        extra = ("--explain", str(tmp_path / "x")) if words != "go with --explain DIR" else ()
        refused = predict(*extra, *options)
        lines = [line for line in refused.stderr.splitlines() if line.strip()]
        assert refused.returncode != 0 and len(lines) == 1 and words in lines[0], refused.stderr
        assert not (tmp_path / "x").exists()  # refused before any picture


# ---------------------------------------------------------------------------------------------------------
# Right where the truth is known: a class decided by a small patch anywhere in the image

SIDE, PATCH, GROW = 48, 8, 3


def patch_images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise images with one bright 8x8 patch at a random place: a plus sign (class 0) or a square ring (class
    1), each of about the same brightness, so only the patch's shape decides the class."""
    plus = np.zeros((PATCH, PATCH), bool)
    plus[3:5, :] = plus[:, 3:5] = True
    ring = np.zeros((PATCH, PATCH), bool)
    ring[[0, 1, -2, -1], :] = ring[:, [0, 1, -2, -1]] = True
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 110, (count, SIDE, SIDE), dtype=np.uint8)
    labels = rng.integers(0, 2, count)
    corners = rng.integers(0, SIDE - PATCH + 1, (count, 2))
    for image, label, (y, x) in zip(images, labels, corners):
        image[y : y + PATCH, x : x + PATCH][(plus, ring)[label]] = 230
    return images, labels, corners


def trained_on_patches(name: str):
    """`name` trained for 4 epochs on 3,000 patch images, inputs standardised by the training set's statistics:
    the model, the 300 test images' split and their patches' corners, and the training pixels' mean and std."""
    from cnnkit.data.tensors import Dataset, Split

    def split(count: int, seed: int) -> tuple[Split, np.ndarray]:
        images, labels, corners = patch_images(count, seed)
        return Split(torch.from_numpy(images[:, None]), torch.from_numpy(labels)), corners

    (train, _), (val, _), (test, corners) = split(3000, 0), split(300, 1), split(300, 2)
    pixels = train.images.float() / 255
    statistics = [float(pixels.mean())], [float(pixels.std())]
    model = cnnkit.build_model(name, (1, SIDE, SIDE), 2, mean=statistics[0], std=statistics[1], seed=0)
    cnnkit.fit(model, Dataset("patches", ["plus", "ring"], train, val, test), epochs=4, batch_size=64,
               progress=False)
    return model, test, corners, statistics


def test_heatmaps_lie_on_the_patch_that_decides_the_class_and_not_for_random_weights():
    """The issue's targets: >= 80% of the map's mass of correctly classified images within the patch's box grown
    by 3 px (8.5% of the image), and the model-randomisation check: maps of the same network with fresh weights
    rank-correlate with the trained ones at <= 0.3. The tutorial's network, with the inputs standardised by the
    training set's statistics (unstandardised, as `--model seed` trains, the mass was 0.38: the ring's evidence
    is the absence of the plus, which positive-only Grad-CAM spreads over the background; docs/insight.md)."""
    model, test, corners, (mean, std) = trained_on_patches("seed")
    images, labels = test.images.numpy(), test.labels.numpy()
    right = cnnkit.predict(model, images).argmax(1).numpy() == labels
    assert right.mean() > 0.9
    maps = cnnkit.explain(model, images)
    assert on_the_patch(maps, corners, right) >= 0.8  # measured: 0.93 (0.84 stretched over the whole image)
    fresh = cnnkit.build_model("seed", (1, SIDE, SIDE), 2, mean=mean, std=std, seed=7)
    random_maps = cnnkit.explain(fresh, images)

    import warnings

    from scipy.stats import spearmanr  # average ranks for ties: both maps are zero where no cell looks

    with warnings.catch_warnings():  # an all-zero map (no positive evidence) has no correlation: NaN, left out
        warnings.simplefilter("ignore")
        correlation = [spearmanr(a, b)[0] for a, b in zip(maps.reshape(len(maps), -1),
                                                          random_maps.reshape(len(maps), -1))]
    assert np.nanmean(correlation) <= 0.3, np.nanmean(correlation)  # measured: 0.24


@pytest.mark.parametrize("name, shape, kwargs, grid", [
    ("seed", (1, 28, 28), {}, ((4.5, 4.5), (4.0, 4.0))),  # 3x3 unpadded convolutions, 2x2 pools: 26, 13, 11, 5 cells
    ("fast", (1, 48, 48), {}, ((9.5, 9.5), (4.0, 4.0))),  # 5x5, two 3x3 unpadded, two pools: 44, 22, 20, 10, 8 cells
    ("fast", (1, 28, 28), {"crop": 2}, ((11.5, 11.5), (4.0, 4.0))),  # the MNIST preset's: 24, 20, 10, 8, 4, 2 cells
    ("airbench", (3, 32, 32), {}, ((4.0, 4.0), (8.0, 8.0))),  # its 2x2 unpadded first convolution, then 31, 15, 7, 3
    ("resnet18", (3, 200, 200), {}, ((0.0, 0.0), (32.0, 32.0))),  # 7 cells 32 px apart, not 200/7 as stretched
    ("resnet", (3, 40, 40), {}, None), ("efficientnet_lite0", (3, 64, 64), {}, None)])  # padded: plain upsampling
def test_the_maps_are_captums_layer_grad_cam_maps_placed_where_the_cells_look(name, shape, kwargs, grid):
    """cnnkit's Grad-CAM is written by hand for speed (heatmaps.grad_cam); Captum's LayerGradCam is the reference,
    cell for cell. Fresh weights of every built-in family, the predicted and a named class, and the same with
    every weight frozen (a frozen backbone: only the input asks for gradients). The cells are then placed where
    they look in the image (worked out by hand in the parameters); padded networks keep Captum's upsampling."""
    captum = pytest.importorskip("captum.attr", reason="Captum is the reference: the test extra installs it")
    from cnnkit.heatmaps import Grid, grad_cam, layer_grid, spatial_layer

    model = cnnkit.build_model(name, shape, 5, mean=[0.5] * shape[0], std=[0.25] * shape[0], seed=3, **kwargs).eval()
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():  # fresh networks start some layers at zero (ResNet-18's head and last BatchNorms): no
        for module in model.modules():  # evidence to compare. Random values instead, as training would leave them.
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0.0, 0.2, generator=generator)
            elif isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0.0, 0.05, generator=generator)
    images = np.random.default_rng(0).integers(0, 256, (6, *shape), dtype=np.uint8)
    batch = torch.from_numpy(images).float()
    layer = spatial_layer(model, batch[:1])
    assert layer_grid(model, layer, shape, torch.device("cpu")) == (Grid(*grid) if grid else None)
    predicted = cnnkit.predict(model, images).argmax(1).tolist()
    for classes in (predicted, [(label + 2) % 5 for label in predicted]):
        cells = captum.LayerGradCam(model, layer).attribute(batch, target=torch.tensor(classes),
                                                             relu_attributions=True).detach()
        assert cells.max() > 0 or classes is not predicted  # evidence for the predicted classes, to compare
        assert torch.allclose(grad_cam(model, layer, batch.clone(), classes), cells, atol=1e-6)
        if grid is None:
            upsampled = captum.LayerAttribution.interpolate(cells, tuple(shape[1:]), "bilinear")[:, 0]
            expected = (upsampled / upsampled.flatten(1).amax(1).clamp_min(1e-12).view(-1, 1, 1)).numpy()
            assert np.allclose(cnnkit.explain(model, images, classes), expected, atol=1e-5)
    assert np.array_equal(cnnkit.explain(model, images), cnnkit.explain(model, images, predicted))
    unfrozen = cnnkit.explain(model, images, predicted)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    assert np.allclose(cnnkit.explain(model, images, predicted), unfrozen, atol=1e-6)


def on_the_patch(maps: np.ndarray, corners: np.ndarray, right: np.ndarray) -> float:
    """The mean share of each correctly classified image's map within its patch's box grown by GROW pixels."""
    return float(np.mean([heat[max(0, y - GROW) : y + PATCH + GROW, max(0, x - GROW) : x + PATCH + GROW].sum()
                          / heat.sum() for heat, (y, x), good in zip(maps, corners, right) if good and heat.sum() > 0]))


def test_a_map_of_unpadded_convolutions_lies_where_its_cells_look_not_stretched_over_the_image():
    """`fast` convolves without padding: its last layer's 8x8 cells look at pixels 9.5 to 37.5 of a 48-pixel image.
    Placed there, more of the map lies on the patch that decides the class than stretched over the whole image
    (measured: 0.53 against 0.34)."""
    from cnnkit.heatmaps import grad_cam, spatial_layer

    model, test, corners, _ = trained_on_patches("fast")
    model.eval()
    images = test.images.numpy()
    predicted = cnnkit.predict(model, images).argmax(1).numpy()
    right = predicted == test.labels.numpy()
    assert right.mean() > 0.9
    batch = torch.from_numpy(images).float()
    cells = grad_cam(model, spatial_layer(model, batch[:1]), batch, predicted.tolist())
    stretched = torch.nn.functional.interpolate(cells, size=(SIDE, SIDE), mode="bilinear")[:, 0].numpy()
    placed, plain = on_the_patch(cnnkit.explain(model, images), corners, right), on_the_patch(stretched, corners, right)
    assert placed >= plain + 0.1, (placed, plain)


def test_a_layer_read_before_an_in_place_activation_gives_captums_maps():
    """`fast` puts ReLU(inplace=True) after each BatchNorm: a kept output changed by it later gave maps up to 0.38
    off Captum's (on maps peaking at 0.67) before the hook handed the network a copy."""
    captum = pytest.importorskip("captum.attr", reason="Captum is the reference: the test extra installs it")
    from cnnkit.heatmaps import grad_cam, named_layer

    model = cnnkit.build_model("fast", (1, 28, 28), 5, mean=[0.5], std=[0.25], seed=3).eval()
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (6, 1, 28, 28), dtype=np.uint8)).float()
    classes = cnnkit.predict(model, batch.to(torch.uint8).numpy()).argmax(1).tolist()
    for name in ("body.3", "body.7", "body.10"):  # the three BatchNorms
        layer = named_layer(model, name)
        cells = captum.LayerGradCam(model, layer).attribute(batch, target=torch.tensor(classes)).detach()
        assert torch.allclose(grad_cam(model, layer, batch, classes), cells.clamp_min(0), atol=1e-6), name


def test_cells_land_where_the_grid_says_and_targets_are_checked():
    from torch import nn

    from cnnkit.heatmaps import Grid, layer_grid, placed, spatial_layer
    from cnnkit.models.fast import CenterCrop

    cells = torch.zeros(1, 1, 3, 3)
    cells[0, 0, 1, 2] = 1.0  # the middle row's last cell: at pixel (4.5 + 4, 4.5 + 8) = (8.5, 12.5)
    picture = placed(cells, Grid((4.5, 4.5), (4.0, 4.0)), (20, 20))[0, 0]
    rows, columns = torch.nonzero(picture == picture.max(), as_tuple=True)
    assert set(rows.tolist()) == {8, 9} and set(columns.tolist()) == {12, 13}
    assert picture[:4].max() == 0 and picture[:, :8].max() == 0  # a cell away from the lit one: nothing
    # The same layer inside a model that crops first looks elsewhere: grids are kept per model.
    model = cnnkit.build_model("fast", (1, 48, 48), 2, seed=0).eval()
    layer = spatial_layer(model, torch.zeros(1, 1, 48, 48))
    cropped = nn.Sequential(CenterCrop(6), model).eval()
    assert layer_grid(model, layer, (1, 48, 48), torch.device("cpu")).first == (9.5, 9.5)
    assert layer_grid(cropped, layer, (1, 60, 60), torch.device("cpu")).first == (15.5, 15.5)
    images = np.zeros((3, 1, 48, 48), np.uint8)
    assert cnnkit.explain(model, images, [1]).shape == (3, 48, 48)  # one class for all
    for target, words in (([0, 1], "2 target classes for 3 images"), (5, "class 5 is not one of this model's 2")):
        with pytest.raises(cnnkit.CnnkitError, match=words):
            cnnkit.explain(model, images, target)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(48 * 48, 2))  # no spatial layer at all
    with pytest.raises(cnnkit.CnnkitError, match="no layer with a spatial feature map"):
        cnnkit.explain(flat, images)


def test_explain_takes_models_and_arguments_as_users_write_them():
    """Found by a hostile reading: a Dropout shared by the body and the head made the default layer a flat one; a
    bad `layer` left hooks behind; inference_mode, a 0-d target and a swapped layer each failed or misled."""
    from torch import nn

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
            self.drop, self.fc1, self.fc2 = nn.Dropout(0.25), nn.Linear(8, 16), nn.Linear(16, 3)

        def forward(self, x):
            x = self.drop(torch.relu(self.c2(torch.relu(self.c1(x))))).mean((2, 3))
            return self.fc2(self.drop(torch.relu(self.fc1(x))))

    torch.manual_seed(0)
    model = Shared().train()
    images = np.random.default_rng(0).integers(0, 256, (4, 1, 16, 16), dtype=np.uint8)
    maps = cnnkit.explain(model, images)
    assert maps.shape == (4, 16, 16) and model.training and model.drop.training  # each mode restored
    with torch.inference_mode():
        assert np.array_equal(cnnkit.explain(model, images), maps)
    target = cnnkit.predict(model.eval(), images[:1]).argmax()  # a 0-d tensor, as argmax gives it
    assert cnnkit.explain(model, images[:1], target).shape == (1, 16, 16)
    for options, words in (({"layer": 3}, "layer must be a module"), ({"batch_size": 0}, "batch_size must be"),
                           ({"target": 2.5}, "target must be class indices"), ({"layer": ""}, "no layer of that")):
        with pytest.raises(cnnkit.CnnkitError, match=words):
            cnnkit.explain(model, images, **options)
    assert not any(module._forward_hooks for module in model.modules())  # nothing left behind
    model.c1 = nn.Conv2d(1, 8, 5)  # unpadded now: the cells move, and the grid is traced again
    assert cnnkit.explain(model, images).shape == (4, 16, 16)
    from cnnkit.heatmaps import _grids

    assert any(grid is not None for grid in _grids[model].values())


def test_cnnkit_explain_stays_the_function_whatever_was_imported_first():
    """The function lived in a module of its own name, cnnkit/explain.py: importing that module (as predict
    --explain and the server do) rebound `cnnkit.explain` to the module, and `cnnkit.explain(model, images)` then
    raised "'module' object is not callable" (the full suite found it). The module is cnnkit/heatmaps.py now."""
    code = ("import cnnkit, cnnkit.heatmaps, cnnkit.prediction, cnnkit.serve.app, cnnkit.stages.write; "
            "print(callable(cnnkit.explain), cnnkit.explain.__module__)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "cnnkit.heatmaps"]

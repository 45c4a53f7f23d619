"""Batch augmentations on real MNIST and CIFAR-10 images: invariants, exact geometry, seeding, and the
per-dataset flip rule (never for digits under flip=auto) seen in what fit() really feeds the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cnnkit.config import resolve_config
from cnnkit.data.augment import (AUGMENTATIONS, erase_side, make_augmentation, random_affine, random_crop,
                                 random_erase, random_zoom, resolve_flip)
from cnnkit.data.cifar import write_cifar10_binary
from cnnkit.data.registry import DATASETS
from cnnkit.data.tensors import load_dataset
from cnnkit.engine.fit import fit
from cnnkit.errors import CnnkitError
from cnnkit.models import build_model
from processes import run_cnnkit
from slices import SHARED_DATA, extract_cifar_subset, mnist_dataset

CIFAR_CLASSES = ("airplane", "automobile", "frog")
PIPELINES = ["shift", "shift=3", "crop", "crop=2", "erase", "erase=0.25", "erase=7", "affine", "affine=15",
             "crop=4,erase=0.5", "shift=2,affine=10", "zoom", "zoom=0.5", "crop=4,zoom=0.6", "none"]


@pytest.fixture(autouse=True)
def one_thread():
    """The small trainings here run on one thread (the machine is shared), and leave the setting as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory) -> Path:
    """train/ and test/ folders of 3 classes of real CIFAR-10 JPEGs (RGB, 32x32)."""
    return extract_cifar_subset(SHARED_DATA / "cifar10-jpg.tar.gz", tmp_path_factory.mktemp("cifar"), CIFAR_CLASSES,
                                {"train": 40, "test": 10})


@pytest.fixture(scope="module")
def cifar(cifar_folder) -> torch.Tensor:
    data = load_dataset(f"imagefolder:{cifar_folder}", str(cifar_folder.parent / "cache"), progress=False)
    return data.train.images[:24]


def mnist_images() -> torch.Tensor:
    return mnist_dataset(limit_train=500, limit_eval=100).train.images[:24]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_each_pipeline_keeps_shape_and_dtype_and_is_seeded(pipeline, cifar):
    for images in (mnist_images(), cifar):
        augment = make_augmentation(pipeline)
        out = augment(images, seeded(3))
        assert out.shape == images.shape and out.dtype == torch.uint8
        assert torch.equal(augment(images, seeded(3)), out)  # the same seed, the same batch
        if pipeline != "none":
            assert not torch.equal(augment(images, seeded(4)), out)
        # Image i stays image i (so labels stay right): the geometry tests below match each output to its
        # own input exactly.


def test_shift_fills_with_black_and_crop_reflects(cifar):
    """shift=P and crop=P outputs are P-bordered windows of the zero- and reflect-padded originals (numpy)."""
    for name, mode in (("shift=2", "constant"), ("crop=4", "reflect")):
        pad = int(name[-1])
        out = make_augmentation(name)(cifar, seeded(0)).numpy()
        padded = np.pad(cifar.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=mode)
        offsets = set()
        for i, image in enumerate(out):
            found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                     if np.array_equal(padded[i, :, dy:dy + 32, dx:dx + 32], image)]
            assert found, f"{name}: image {i} is not a window of its padded original"
            offsets.add(found[0])
        assert len(offsets) > 5  # offsets are drawn per image, not one for the batch


def test_crop_larger_than_the_image_is_refused():
    with pytest.raises(CnnkitError, match="crop=28 needs images larger than 28 px"):
        random_crop(mnist_images(), 28, seeded())


@pytest.mark.parametrize("size, side", [(0.5, 16), (0.25, 8), (7, 7), (1, 1), (32, 32)])
def test_erase_fills_one_square_of_the_exact_size_inside_the_image(cifar, size, side):
    assert erase_side(size, 32, 32) == side
    out = random_erase(cifar, size, seeded(1))
    mean = np.round(cifar.numpy().astype(np.float64).mean(axis=(2, 3)))  # per image and channel
    corners = set()
    for i in range(len(cifar)):
        matches = []
        for top in range(32 - side + 1):  # only windows wholly inside the image are candidates
            for left in range(32 - side + 1):
                expected = cifar[i].numpy().copy()
                expected[:, top:top + side, left:left + side] = mean[i].reshape(-1, 1, 1)
                if np.array_equal(expected, out[i].numpy()):
                    matches.append((top, left))
        assert matches, f"image {i}: the change is not one {side}x{side} square inside the image"
        corners.add(matches[0])
    assert side == 32 or len(corners) > 5


def test_erase_refuses_a_square_larger_than_the_images():
    with pytest.raises(CnnkitError, match="larger than the 28x28 images"):
        make_augmentation("erase=30")(mnist_images(), seeded())


def test_affine_without_rotation_or_zoom_is_the_identity(cifar):
    for images in (mnist_images(), cifar):
        assert torch.equal(random_affine(images, 0.0, seeded(), scale=(1.0, 1.0)), images)


def test_affine_rotates_about_the_centre_as_pil_does():
    """Zoom fixed at 1: each image matches PIL's bilinear rotation by the angle drawn for it (clockwise)."""
    images = mnist_images()
    out = random_affine(images, 30.0, seeded(5), scale=(1.0, 1.0))
    angles = (-30 + 60 * torch.rand(len(images), generator=seeded(5), dtype=torch.float64)).tolist()
    for image, rotated, angle in zip(images, out, angles):
        reference = np.asarray(Image.fromarray(image[0].numpy()).rotate(-angle, resample=Image.BILINEAR))
        assert np.abs(reference.astype(int) - rotated[0].numpy().astype(int)).mean() < 0.5  # of 0-255
    assert (out.float() - images.float()).abs().mean() > 10  # and it did rotate


def test_zoom_of_the_whole_frame_at_one_aspect_is_the_identity(cifar):
    for images in (mnist_images(), cifar):
        assert torch.equal(random_zoom(images, 1.0, seeded(), aspect=(1.0, 1.0)), images)


def test_zoom_crops_and_stretches_as_pil_resizing_a_box_does(cifar):
    """Each photo matches PIL's bilinear resize of the rectangle drawn for it (area, aspect, then place)."""
    n, _, height, width = cifar.shape
    out = random_zoom(cifar, 0.3, seeded(7))
    generator = seeded(7)

    def draw(low: float, high: float) -> torch.Tensor:  # as random_zoom draws, in its order
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    area, ratio = draw(0.3, 1.0), torch.exp(draw(np.log(3 / 4), np.log(4 / 3)))
    box_width, box_height = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)
    centre_x, centre_y = (1 - box_width) * draw(-1, 1), (1 - box_height) * draw(-1, 1)
    for i, (image, zoomed) in enumerate(zip(cifar, out)):
        left, top = (centre_x[i] - box_width[i] + 1) / 2 * width, (centre_y[i] - box_height[i] + 1) / 2 * height
        box = (left.item(), top.item(), left.item() + box_width[i].item() * width,
               top.item() + box_height[i].item() * height)
        assert 0 <= box[0] and 0 <= box[1] and box[2] <= width + 1e-9 and box[3] <= height + 1e-9  # inside
        assert 0.3 - 1e-9 <= (box[2] - box[0]) * (box[3] - box[1]) / (width * height)  # at least the area asked
        reference = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width, height), Image.BILINEAR, box=box)
        difference = np.abs(np.asarray(reference).astype(int) - zoomed.permute(1, 2, 0).numpy().astype(int))
        assert difference.mean() < 0.5 and difference.max() <= 2  # of 0-255
    assert (out.float() - cifar.float()).abs().mean() > 10  # and it did zoom


@pytest.mark.parametrize("text, message", [
    ("crp", "--augment has an unknown item 'crp' (did you mean 'crop'?)"),
    ("crop=2.5", "--augment item crop=2.5: must be a whole number of pixels from 1 to 64"),
    ("shift=0", "--augment item shift=0: must be a whole number of pixels from 1 to 64"),
    ("erase=1.5", "--augment item erase=1.5: must be a fraction of the side between 0 and 1"),
    ("affine=200", "--augment item affine=200: must be a rotation in degrees from 0 to 180"),
    ("zoom=0", "--augment item zoom=0: must be the smallest fraction of the image's area to keep"),
    ("crop=x", "--augment item 'crop=x': 'x' is not a number"),
    ("none,crop", "--augment combines 'none' with other items"),
    ("flip-crop", "--augment has an unknown item 'flip-crop'"),
    ("crop,,erase", "--augment has an empty item"),
])
def test_schema_reports_a_bad_pipeline_naming_the_item(text, message):
    from cnnkit.config import cli_flag

    with pytest.raises(CnnkitError) as caught:
        resolve_config(augment=text, spell=cli_flag)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_schema_accepts_pipelines_and_its_help_names_every_item():
    from cnnkit.config import option_of

    assert resolve_config(augment="crop=4,erase=0.5").augment == "crop=4,erase=0.5"
    for name in AUGMENTATIONS:
        assert name in option_of("augment").help


def test_cli_rejects_a_bad_pipeline_in_one_line(tmp_path):

    result = run_cnnkit("train", "--augment", "crop=4,eras=0.5",
                        "--runs-dir", str(tmp_path), timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "--augment has an unknown item 'eras' (did you mean 'erase'?)" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# flip: a per-dataset property, overridable


def test_every_builtin_dataset_says_whether_mirroring_keeps_its_classes():
    assert {name: spec.mirror_ok for name, spec in DATASETS.items()} == {
        "mnist": False, "kmnist": False, "fashion-mnist": True, "cifar10": True, "cifar100": True}


def test_loaded_datasets_carry_their_mirror_property(tmp_path, cifar_folder):
    assert mnist_dataset(limit_train=500, limit_eval=100).mirror_ok is False
    fashion = load_dataset("fashion-mnist", str(SHARED_DATA), limit_train=100, limit_eval=10, progress=False)
    assert fashion.mirror_ok is True
    colour = load_dataset(f"imagefolder:{cifar_folder}", str(tmp_path / "cache"), progress=False)
    assert colour.mirror_ok is True
    gray = load_dataset(f"imagefolder:{cifar_folder}", str(tmp_path / "cache"), channels=1, progress=False)
    assert gray.mirror_ok is False  # grayscale folders are taken as digits or characters
    assert [resolve_flip(choice, False) for choice in ("auto", "yes", "no")] == [False, True, False]
    assert [resolve_flip(choice, True) for choice in ("auto", "yes", "no")] == [True, True, False]


def _fed_images(data, **options) -> torch.Tensor:
    """The training images fit() passed to the model (one epoch, no other augmentation)."""
    model = build_model("seed", data.input_shape, data.num_classes, seed=0)
    fed: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda module, args: fed.append(args[0].detach().clone())
                                    if module.training else None)
    fit(model, data, epochs=1, batch_size=32, progress=False, device="cpu", precision="fp32", **options)
    return torch.cat(fed)


def _count_mirrored(fed: torch.Tensor, originals: torch.Tensor) -> tuple[int, int]:
    """(images fed as they are, images fed mirrored and not as they are)."""
    plain = {bytes(image.contiguous().numpy().tobytes()) for image in originals}
    mirrored = {bytes(image.flip(-1).contiguous().numpy().tobytes()) for image in originals}
    keys = [bytes(image.contiguous().numpy().tobytes()) for image in fed]
    return sum(key in plain for key in keys), sum(key in mirrored and key not in plain for key in keys)


def test_fit_never_mirrors_mnist_under_flip_auto_but_does_when_told():
    data = mnist_dataset(limit_train=500, limit_eval=100)
    fed = _fed_images(data, flip="auto")
    assert len(fed) == len(data.train)
    assert _count_mirrored(fed, data.train.images) == (len(fed), 0)
    plain, mirrored = _count_mirrored(_fed_images(data, flip="yes"), data.train.images)
    assert plain + mirrored == len(fed) and 150 < mirrored < 350  # about half


def test_fit_mirrors_half_of_fashion_and_cifar_under_flip_auto(tmp_path, cifar_folder):
    fashion = load_dataset("fashion-mnist", str(SHARED_DATA), limit_train=400, limit_eval=50, progress=False)
    # The named cifar10 dataset, from a binary archive of real CIFAR-10 images (the JPEG set, decoded).
    folder = load_dataset(f"imagefolder:{cifar_folder}", str(tmp_path / "cache"), val=1, progress=False)
    images, labels = folder.train.images.numpy(), folder.train.labels.numpy()
    write_cifar10_binary(tmp_path / "data" / "cifar10" / "cifar-10-binary.tar.gz", images, labels, images[:20],
                         labels[:20])
    cifar = load_dataset("cifar10", str(tmp_path / "data"), val=20, download=False, progress=False)
    assert cifar.name == "cifar10" and cifar.mirror_ok
    for data in (fashion, cifar):
        fed = _fed_images(data, flip="auto")
        plain, mirrored = _count_mirrored(fed, data.train.images)
        assert plain + mirrored == len(data.train)
        assert 0.3 * len(fed) < mirrored < 0.7 * len(fed), data.name
        assert _count_mirrored(_fed_images(data, flip="no"), data.train.images) == (len(fed), 0)


# ---------------------------------------------------------------------------------------------------------
# mixup / cutmix: images blended with a shuffled copy of the batch, both labels in the loss


def _partners_matching(image: np.ndarray, expected_with, count: int, tolerance: int = 0) -> list[int]:
    """The j in range(count) for which `expected_with(j)` is `image` (to within `tolerance` grey levels)."""
    return [j for j in range(count)
            if np.abs(image.astype(np.int64) - expected_with(j).astype(np.int64)).max() <= tolerance]


def test_mixup_blends_each_image_with_a_partner_whose_label_it_reports(cifar):
    from cnnkit.data.mix import make_mix

    labels = torch.arange(len(cifar)) % 3
    out, partners, lam = make_mix("mixup", 1.0)(cifar, labels, seeded(2))
    assert out.dtype == torch.uint8 and out.shape == cifar.shape and 0 < lam < 1
    again = make_mix("mixup", 1.0)(cifar, labels, seeded(2))
    assert torch.equal(again[0], out) and torch.equal(again[1], partners) and again[2] == lam
    a = cifar.numpy().astype(np.float64)
    for i in range(len(cifar)):
        # float32 in the code, float64 here: a half-level tie may round the other way
        found = _partners_matching(out[i].numpy(), lambda j: np.round(lam * a[i] + (1 - lam) * a[j]), len(a), 1)
        assert found and labels[found[0]] == partners[i]


def test_cutmix_pastes_one_box_of_the_reported_area_from_a_partner(cifar):
    from cnnkit.data.mix import make_mix

    labels = torch.arange(len(cifar)) % 3
    out, partners, lam = make_mix("cutmix", 1.0)(cifar, labels, seeded(7))
    changed = (out != cifar).any(dim=1).any(dim=0).nonzero()  # (row, col) changed in any image
    top, left = changed.min(0).values.tolist()
    bottom, right = (changed.max(0).values + 1).tolist()
    assert lam == pytest.approx(1 - (bottom - top) * (right - left) / (32 * 32))
    a = cifar.numpy()
    for i in range(len(cifar)):
        def pasted(j, i=i):
            expected = a[i].copy()
            expected[:, top:bottom, left:right] = a[j][:, top:bottom, left:right]
            return expected
        found = _partners_matching(out[i].numpy(), pasted, len(a))
        assert found and labels[found[0]] == partners[i]


def test_mixed_loss_is_the_lam_weighted_cross_entropy_of_both_labels():
    from cnnkit.data.mix import mixed_cross_entropy

    logits = torch.randn(6, 4, generator=seeded(0))
    labels, partners = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 2, 1, 0, 0, 1])
    by_hand = [0.3 * -logits[i].log_softmax(0)[labels[i]] + 0.7 * -logits[i].log_softmax(0)[partners[i]]
               for i in range(6)]
    torch.testing.assert_close(mixed_cross_entropy(logits, labels, partners, 0.3), torch.stack(by_hand).mean())
    torch.testing.assert_close(mixed_cross_entropy(logits, labels, partners, 1.0),
                               torch.nn.functional.cross_entropy(logits, labels))


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_fit_trains_with_mix_and_a_pipeline(mix):
    data = mnist_dataset(limit_train=500, limit_eval=100)
    model = build_model("seed", data.input_shape, data.num_classes, seed=0)
    history = fit(model, data, epochs=3, batch_size=25, progress=False, mix=mix, mix_alpha=0.4,
                  augment="shift=2,erase=6", device="cpu", precision="fp32")
    # measured 0.81 (mixup) and 0.83 (cutmix) after 3 epochs of 500 images
    assert history.history["loss"][-1] < history.history["loss"][0] and history.history["val_accuracy"][-1] > 0.6

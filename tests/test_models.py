import pytest
import torch

from cnnkit.errors import CnnkitError
from cnnkit.models import build_model, list_models
from cnnkit.models.summary import count_parameters, summarize


def test_seed_model_matches_the_tutorial_parameter_count_and_shapes():
    model = build_model("seed", (1, 28, 28), 10)
    assert count_parameters(model) == (225_034, 225_034)
    rows = [row for row in summarize(model, (1, 28, 28)) if row.kind != "Rescaling"]
    # Keras's summary of the tutorial: the same layers, output shapes and parameter counts.
    expected = [
        ("Conv2d", (32, 26, 26), 320), ("ReLU", (32, 26, 26), 0), ("MaxPool2d", (32, 13, 13), 0),
        ("Conv2d", (64, 11, 11), 18_496), ("ReLU", (64, 11, 11), 0), ("MaxPool2d", (64, 5, 5), 0),
        ("Flatten", (1600,), 0), ("Linear", (128,), 204_928), ("ReLU", (128,), 0), ("Linear", (10,), 1_290),
    ]
    assert [(r.kind, r.output_shape, r.params) for r in rows] == expected


@pytest.mark.parametrize("name", [entry.name for entry in list_models()])
@pytest.mark.parametrize("shape,classes", [((1, 28, 28), 10), ((3, 32, 32), 100)])
def test_every_model_maps_uint8_images_to_one_logit_per_class(name, shape, classes):
    model = build_model(name, shape, classes).eval()
    images = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (5, classes)
    assert torch.isfinite(logits).all()


def test_seed_model_scales_pixels_to_unit_range_like_the_tutorial():
    model = build_model("seed")
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert torch.allclose(model.rescale(images), torch.tensor([0.0, 0.2, 1.0]).view(1, 1, 1, 3))


def test_standardising_models_use_the_given_statistics():
    model = build_model("fast", mean=[33.0], std=[78.0])
    images = torch.tensor([33, 111], dtype=torch.uint8).view(1, 1, 1, 2)
    assert torch.allclose(model.rescale(images), torch.tensor([0.0, 1.0]).view(1, 1, 1, 2))


def test_unknown_model_is_a_user_error_listing_the_known_ones():
    with pytest.raises(CnnkitError, match="unknown model 'nope'.*seed"):
        build_model("nope")

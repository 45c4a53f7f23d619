"""Class imbalance: said when training starts, balanced accuracy and macro-F1 recorded and shown, and the two
remedies (--class-weight balanced, --sampler balanced) doing what they say. Which one helps more, and by how
much, is measured in benchmarks/imbalance.py, not here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cnnkit.data.balance import balanced_class_weights, balanced_order, imbalance_of
from cnnkit.data.tensors import Split, train_batches
from slices import mnist_arrays, write_mnist_folder
from test_hostile_inputs import cnnkit, one_error_line

RARE = ["5", "6", "7", "8", "9"]


def test_balanced_class_weights_give_every_class_the_same_total_weight():
    labels = torch.tensor([0] * 30 + [1] * 10 + [3] * 5)  # class 2 has no image
    weights = balanced_class_weights(labels, 4)
    totals = [float(weights[c]) * int((labels == c).sum()) for c in (0, 1, 3)]
    assert totals == pytest.approx([15.0, 15.0, 15.0])  # N / K each: 45 images over 3 present classes
    assert float(weights[2]) == 0.0


def test_weighted_loss_of_two_halves_is_the_weighted_loss_of_the_whole_batch():
    """Micro-batches (and data-parallel ranks) average their losses by size: the class-weighted loss must add up
    the same way, which PyTorch's weighted mean (divided by each part's sum of weights) does not."""
    from cnnkit.data.mix import mixed_cross_entropy

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=generator)
    labels = torch.cat([torch.zeros(40, dtype=torch.long), torch.randint(1, 10, (24,), generator=generator)])
    weights = balanced_class_weights(labels, 10)
    whole = mixed_cross_entropy(logits, labels, labels, 1.0, 0.1, weights)
    halves = [mixed_cross_entropy(logits[part], labels[part], labels[part], 1.0, 0.1, weights)
              for part in (slice(0, 32), slice(32, 64))]
    assert float(whole) == pytest.approx(float(sum(halves) / 2), rel=1e-6)
    plain = mixed_cross_entropy(logits, labels, labels, 1.0, 0.1)
    assert float(whole) != pytest.approx(float(plain))  # the weights do change the loss


def test_balanced_draws_give_each_class_an_equal_share_from_the_same_generator():
    _, labels = mnist_arrays("train")
    labels = torch.from_numpy(labels[:6000])
    skewed = torch.cat([torch.nonzero(labels < 5).flatten(), torch.nonzero(labels >= 5).flatten()[:300]])
    labels = labels[skewed]  # digits 0-4 at ~600 images each, 5-9 at ~60
    first = balanced_order(labels, torch.Generator().manual_seed(3))
    again = balanced_order(labels, torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and len(first) == len(labels)  # a seed repeats the epoch (and a resume)
    shares = torch.bincount(labels[first], minlength=10).double() / len(first)
    assert shares.min() > 0.07 and shares.max() < 0.13, shares  # 0.1 each, against 0.02 for a rare digit unbalanced
    split = Split(torch.zeros(len(labels), 1, 2, 2, dtype=torch.uint8), labels)
    drawn = torch.cat([batch for _, batch in train_batches(split, 64, generator=torch.Generator().manual_seed(3),
                                                          balanced=True)])
    assert torch.equal(drawn, labels[first])  # training draws exactly that order, batch by batch


def test_imbalance_is_named_only_beyond_two_to_one_and_with_enough_images_to_tell():
    classes = ["a", "b", "c"]
    assert imbalance_of(torch.tensor([0] * 200 + [1] * 100 + [2] * 120), classes) is None  # 2:1 is not imbalanced
    found = imbalance_of(torch.tensor([0] * 300 + [1] * 100 + [2] * 200), classes)
    assert found is not None and found.ratio == 3.0 and found.rare == ("b",)
    assert imbalance_of(torch.tensor([0] * 30 + [1] * 10 + [2] * 20), classes) is None  # 20 a class: chance


@pytest.fixture(scope="module")
def imbalanced_folder(tmp_path_factory) -> Path:
    """Real MNIST PNGs: digits 0-4 with 200 training images each, 5-9 with 20; 20 test images of each digit."""
    counts = {digit: 200 if digit < 5 else 20 for digit in range(10)}
    return write_mnist_folder(tmp_path_factory.mktemp("imbalanced"), counts, test_per_class=20)


def train(folder: Path, work: Path, name: str, *options: str):
    result = cnnkit("train", "--dataset", f"imagefolder:{folder}", "--epochs", "2", "--no-checkpoint", "--runs-dir",
                    str(work / "runs"), "--data-dir", str(work / "data"), "--name", name, *options)
    assert result.returncode == 0, result.stderr
    return result, json.loads((work / "runs" / name / "metrics.json").read_text())


def test_an_imbalanced_folder_is_said_and_scored_with_balanced_accuracy(imbalanced_folder, tmp_path):
    result, metrics = train(imbalanced_folder, tmp_path, "plain", "--quiet")
    counts = metrics["train_class_counts"]  # the training split's: validation images were held out of it
    assert sum(counts.values()) == metrics["num_train"] and counts["0"] > 5 * counts["9"]
    ratio = max(counts.values()) / min(counts.values())
    assert metrics["imbalance"]["ratio"] == pytest.approx(ratio) and sorted(metrics["imbalance"]["rare"]) == RARE
    rare = ", ".join(metrics["imbalance"]["rare"])
    assert f"the training classes are imbalanced {ratio:.1f}:1 (rare: {rare})" in result.stderr  # even with --quiet
    assert "--class-weight balanced or --sampler balanced" in result.stderr
    recalls = [scores["recall"] for scores in metrics["test_report"]["per_class"].values()]
    assert metrics["balanced_accuracy"] == pytest.approx(sum(recalls) / 10)
    assert metrics["macro_f1"] == pytest.approx(metrics["test_report"]["macro_f1"])
    page = (tmp_path / "runs" / "plain" / "report.html").read_text()
    assert f"imbalanced {ratio:.1f}:1 (rare: {rare})" in page and "balanced accuracy" in page


def test_the_remedies_silence_the_warning_and_the_summary_shows_balanced_accuracy(imbalanced_folder, tmp_path):
    result, metrics = train(imbalanced_folder, tmp_path, "sampled", "--sampler", "balanced")
    assert "imbalanced" not in result.stderr  # the user already answered it
    line = next(line for line in result.stdout.splitlines() if line.startswith("training classes imbalanced"))
    assert f"balanced accuracy {metrics['balanced_accuracy']:.4f}" in line
    assert f"rare: {', '.join(metrics['imbalance']['rare'])}" in line
    weighted, _ = train(imbalanced_folder, tmp_path, "weighted", "--class-weight", "balanced", "--quiet")
    assert "imbalanced" not in weighted.stderr
    config = json.loads((tmp_path / "runs" / "weighted" / "config.json").read_text())
    assert (config["class_weight"], config["sampler"]) == ("balanced", "shuffle")


def test_balanced_draws_from_images_on_disk_are_refused_in_one_line(imbalanced_folder, tmp_path):
    result = cnnkit("train", "--dataset", f"imagefolder:{imbalanced_folder}", "--epochs", "1", "--stream", "yes",
                    "--sampler", "balanced", "--runs-dir", str(tmp_path / "runs"), "--data-dir", str(tmp_path / "d"))
    assert "--sampler balanced" in one_error_line(result) and "--stream no" in one_error_line(result)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())  # no run, no debris

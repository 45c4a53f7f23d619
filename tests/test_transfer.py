"""Transfer learning and parameter groups: --init, --weights, freezing, backbone learning rate, no decay on
norms and biases; on real models and real MNIST / Fashion-MNIST slices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cnnkit
from cnnkit.api import model_for
from cnnkit.engine.callbacks import Callback
from cnnkit.engine.optim import make_optimizer, param_groups, set_lr
from cnnkit.errors import CnnkitError
from slices import SHARED_DATA, mnist_dataset


@pytest.fixture(autouse=True)
def one_thread():
    """The machine's cores are shared: in-process training here uses one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def quiet(*_args) -> None:
    pass


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """A real `fast` run on an MNIST slice: the earlier run that the tests fine-tune from."""
    runs = tmp_path_factory.mktemp("runs")
    result = cnnkit.train(model="fast", dataset="mnist", data_dir=str(SHARED_DATA), epochs=1, limit_train=2000,
                          limit_eval=300, lr=3e-3, runs_dir=str(runs), name="digits", progress=False, log=quiet)
    return result.run_dir


@pytest.fixture(scope="module")
def clothing():
    return cnnkit.load_dataset("fashion-mnist", str(SHARED_DATA), limit_train=1000, limit_eval=300, progress=False)


def config(**options):
    return cnnkit.resolve_config(data_dir=str(SHARED_DATA), **options)


# ---------------------------------------------------------------------------------------------------------
# Parameter groups


def test_weight_decay_skips_norms_and_biases_and_the_groups_cover_every_parameter():
    model = cnnkit.build_model("fast", (1, 28, 28), 10)
    optimizer = make_optimizer(model, "adamw", 0.1, 0.5)
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert sorted(map(id, grouped)) == sorted(id(p) for p in model.parameters())  # each exactly once
    for group in optimizer.param_groups:
        assert all((group["weight_decay"] == 0) == (p.ndim <= 1) for p in group["params"])
        assert group["fused"] is True
    assert {type(m).__name__ for m in model.modules() for p in m.parameters(recurse=False) if p.ndim <= 1} == {
        "BatchNorm2d", "Linear"}  # BatchNorm scales/shifts and the head's bias

    # With zero gradients AdamW's step is the decay alone: kernels shrink by lr * wd, the rest stays.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.1 * 0.5) if p.ndim > 1 else before[name]
        assert torch.allclose(p.detach(), expected, atol=1e-7), name


def test_backbone_groups_get_the_scaled_rate_and_the_head_the_full_one():
    model = cnnkit.build_model("fast", (1, 28, 28), 10)
    groups = param_groups(model, 5e-4, backbone_lr_scale=0.1)
    head = {id(p) for p in model.head_parameters()}
    assert head == {id(model.body[-1].weight), id(model.body[-1].bias)}
    for group in groups:
        assert group["lr_scale"] == (1.0 if all(id(p) in head for p in group["params"]) else 0.1)
    optimizer = make_optimizer(model, "sgd", 1.0, 5e-4, backbone_lr_scale=0.1)
    set_lr(optimizer, 0.02)
    assert optimizer.param_groups[0]["lr"] == 0.02  # full-rate groups first: the schedule's rate is logged
    rates = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert all(rates[id(p)] == (0.02 if id(p) in head else pytest.approx(0.002)) for p in model.parameters())


def test_biases_and_norm_shifts_get_the_bias_rate_and_no_decay():
    model = cnnkit.build_model("airbench", (3, 32, 32), 10, widths=[16, 32, 32])
    optimizer = make_optimizer(model, "sgd", 1.0, 5e-4, bias_lr_scale=64)
    set_lr(optimizer, 0.01)
    assert optimizer.param_groups[0]["lr"] == 0.01  # the weights' group first: the schedule's rate is logged
    rates = {id(p): (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        expected = (0.64, 0.0) if name.endswith("bias") else (0.01, 0.0) if p.ndim <= 1 else (0.01, 5e-4)
        assert rates[id(p)] == expected, name  # BatchNorm scales keep the weights' rate, undecayed


# ---------------------------------------------------------------------------------------------------------
# --init RUN


def test_init_with_other_classes_replaces_only_the_head(digits_run, clothing):
    saved = load_file(str(digits_run / "model.safetensors"))
    model = model_for(config(model="fast", dataset="fashion-mnist", init=str(digits_run)), clothing)
    fresh = cnnkit.build_model("fast", (1, 28, 28), 10, seed=0)
    head = {"body.14.weight", "body.14.bias"}
    for key, value in model.state_dict().items():
        if key in head:
            assert torch.equal(value, fresh.state_dict()[key]) and not torch.equal(value, saved[key])
        else:
            assert torch.equal(value, saved[key]), key  # bit for bit, normalisation buffers included
    meta = json.loads((digits_run / "model.json").read_text())
    assert model.rescale.mean == meta["preprocessing"]["mean"]  # the features' own input scaling is kept
    assert model.weights_from["head"] == "new (the classes differ)" and set(model.weights_from["new_keys"]) == head

    same = model_for(config(model="fast", init=str(digits_run)), mnist_dataset(500, 100))
    assert all(torch.equal(value, saved[key]) for key, value in same.state_dict().items())  # same classes: all


def test_init_refuses_another_architecture_or_other_widths(digits_run, clothing):
    with pytest.raises(CnnkitError, match=r"that run's model is 'fast' and this one's is 'seed'.*--model fast"):
        model_for(config(model="seed", dataset="fashion-mnist", init=str(digits_run)), clothing)
    other = config(model="fast", model_kwargs={"widths": [8, 16, 32]}, init=str(digits_run))
    with pytest.raises(CnnkitError, match=r"shape differs, file vs model \(\d+\): body\.1\.weight \(16, 1, 5, 5\)"):
        model_for(other, clothing)
    with pytest.raises(CnnkitError, match="not a run directory"):
        config(init=str(digits_run.parent / "nothing"))
    with pytest.raises(CnnkitError, match="init and weights both"):
        config(init=str(digits_run), weights=str(digits_run / "model.safetensors"))


class Snapshots(Callback):
    """The parameters at the end of each epoch, and whether each required a gradient then."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.trainable: list[dict[str, bool]] = []
        self.rates: list[dict[int, float]] = []  # each parameter's learning rate / the logged (schedule's) one

    def on_epoch_end(self, epoch, logs) -> None:
        named = list(self.model.named_parameters())
        self.rates.append({id(p): group["lr"] / logs["lr"] for group in self.state.optimizer.param_groups
                           for p in group["params"]})
        self.weights.append({name: p.detach().clone() for name, p in named})
        self.trainable.append({name: p.requires_grad for name, p in named})


def test_freezing_keeps_the_backbone_for_the_frozen_epochs_then_trains_it(digits_run, clothing):
    model = model_for(config(model="fast", dataset="fashion-mnist", init=str(digits_run)), clothing)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    snapshots = Snapshots()
    cnnkit.fit(model, clothing, epochs=3, lr=3e-3, freeze_epochs=2, backbone_lr_scale=0.25, keep="last",
               schedule="cosine", progress=False, callbacks=[snapshots])
    head = {"body.14.weight", "body.14.bias"}
    for rates in snapshots.rates:  # the backbone at a quarter of the (scheduled) rate all along
        assert all(rates[id(p)] == pytest.approx(1.0 if name in head else 0.25) for name, p in model.named_parameters())
    for epoch in (0, 1):  # epochs 1 and 2: only the head moved
        for name, value in snapshots.weights[epoch].items():
            assert torch.equal(value, start[name]) == (name not in head), (epoch + 1, name)
            assert snapshots.trainable[epoch][name] == (name in head)
    moved = [name for name, value in snapshots.weights[2].items() if not torch.equal(value, start[name])]
    assert set(moved) == set(start)  # epoch 3: everything trains
    assert all(p.requires_grad for p in model.parameters())  # and the model is left trainable


def test_freezing_leaves_layers_frozen_by_design_frozen():
    model = cnnkit.build_model("fast", (1, 28, 28), 10)
    model.body[1].weight.requires_grad_(False)  # e.g. airbench's frozen whitening layer
    data = mnist_dataset(500, 100)
    cnnkit.fit(model, data, epochs=2, freeze_epochs=1, progress=False)
    assert not model.body[1].weight.requires_grad and model.body[5].weight.requires_grad


def test_an_init_run_records_where_its_weights_came_from(digits_run, tmp_path):
    result = cnnkit.train(model="fast", dataset="fashion-mnist", init=str(digits_run), freeze_epochs=1,
                          backbone_lr_scale=0.3, data_dir=str(SHARED_DATA), epochs=2, limit_train=1000,
                          limit_eval=300, runs_dir=str(tmp_path), progress=False, log=quiet)
    saved_config = json.loads((result.run_dir / "config.json").read_text())
    assert (saved_config["init"], saved_config["freeze_epochs"], saved_config["backbone_lr_scale"]) == (
        str(digits_run), 1, 0.3)
    for record in (result.metrics["weights_from"],
                   json.loads((result.run_dir / "model.json").read_text())["weights_from"],
                   json.loads((result.run_dir / "metrics.json").read_text())["weights_from"]):
        assert record["kind"] == "init" and record["path"] == str(digits_run.resolve())
        assert record["dataset"] == "mnist" and len(record["sha256"]) == 64
    run = cnnkit.load_run(result.run_dir)  # an ordinary run: loads with nothing else
    assert run.classes == cnnkit.load_dataset("fashion-mnist", str(SHARED_DATA), limit_train=10, limit_eval=10,
                                              progress=False).classes


# ---------------------------------------------------------------------------------------------------------
# --weights FILE.safetensors


def test_weights_load_an_exactly_matching_state_dict(digits_run, tmp_path):
    saved = load_file(str(digits_run / "model.safetensors"))
    data = mnist_dataset(500, 100)
    model = model_for(config(model="fast", weights=str(digits_run / "model.safetensors")), data)
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    assert model.weights_from["kind"] == "weights"

    body_only = tmp_path / "body.safetensors"  # the bare network's keys, without cnnkit's wrapper
    save_file({key.removeprefix("body."): value for key, value in saved.items() if key.startswith("body.")},
              str(body_only))
    model = model_for(config(model="fast", weights=str(body_only)), data)
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items() if key.startswith("body."))


def test_weights_that_do_not_fit_name_the_first_keys(digits_run, tmp_path):
    data = mnist_dataset(500, 100)
    with pytest.raises(CnnkitError) as raised:
        model_for(config(model="seed", weights=str(digits_run / "model.safetensors")), data)
    message = str(raised.value)
    assert message.startswith(f"--weights {digits_run / 'model.safetensors'}: the weights do not fit this model:")
    assert "missing (" in message and "unexpected (" in message and "\n" not in message
    saved = load_file(str(digits_run / "model.safetensors"))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in saved.items() if k != "body.14.bias"}, str(partial))
    with pytest.raises(CnnkitError, match=r"missing \(1\): body\.14\.bias;"):
        model_for(config(model="fast", weights=str(partial)), data)
    pickle = tmp_path / "model.pt"
    torch.save(saved, pickle)
    with pytest.raises(CnnkitError, match="only .safetensors files are read"):
        config(weights=str(pickle))

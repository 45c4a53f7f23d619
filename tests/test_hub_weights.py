"""ResNets in timm's layout, and weights from the Hugging Face Hub's cache, offline.

No machine here reaches the Hub, and timm does not load beside the CPU build of torch, so: the architecture is
checked against what timm's (and torchvision's) source defines, independently of cnnkit's code (parameter
counts and the names and shapes of its tensors), and the Hub is a cache written by these tests in
huggingface_hub's own layout (`models--ORG--NAME/{refs,snapshots,blobs}`), read with HF_HUB_OFFLINE=1 through a
real `cnnkit train` process. The weights in it are real safetensors files, made from a seeded network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from processes import run_cnnkit
from slices import SHARED_DATA

pytest.importorskip("huggingface_hub", reason='needs huggingface_hub: pip install "cnnkit[pretrained]"')

COMMIT = "0123456789abcdef0123456789abcdef01234567"
#: Parameters of torchvision's and timm's resnet18/34/50 with the 1000-class head (their documented sizes).
PARAMETERS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


def timm_keys(blocks: tuple[int, ...], bottleneck: bool) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes of timm's ResNet (timm/models/resnet.py, torchvision's names), written
    from its definition: conv1/bn1, layerN.M.conv1..3/bn1..3, downsample.0/.1 on a stage's first block, fc."""
    def bn(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
        return {f"{prefix}.{name}": (channels,) for name in ("weight", "bias", "running_mean", "running_var")}

    keys = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for stage, count in enumerate(blocks, start=1):
        planes = 64 * 2 ** (stage - 1)
        out = planes * (4 if bottleneck else 1)
        for index in range(count):
            prefix = f"layer{stage}.{index}"
            if bottleneck:
                keys.update({f"{prefix}.conv1.weight": (planes, inplanes, 1, 1), **bn(f"{prefix}.bn1", planes),
                             f"{prefix}.conv2.weight": (planes, planes, 3, 3), **bn(f"{prefix}.bn2", planes),
                             f"{prefix}.conv3.weight": (out, planes, 1, 1), **bn(f"{prefix}.bn3", out)})
            else:
                keys.update({f"{prefix}.conv1.weight": (planes, inplanes, 3, 3), **bn(f"{prefix}.bn1", planes),
                             f"{prefix}.conv2.weight": (planes, planes, 3, 3), **bn(f"{prefix}.bn2", planes)})
            if index == 0 and (stage > 1 or inplanes != out):
                keys.update({f"{prefix}.downsample.0.weight": (out, inplanes, 1, 1), **bn(f"{prefix}.downsample.1", out)})
            inplanes = out
    keys.update({"fc.weight": (1000, inplanes), "fc.bias": (1000,)})
    return keys


@pytest.mark.parametrize("name, blocks, bottleneck", [("resnet18", (2, 2, 2, 2), False),
                                                      ("resnet34", (3, 4, 6, 3), False),
                                                      ("resnet50", (3, 4, 6, 3), True)])
def test_cnnkit_resnets_have_timms_tensor_names_shapes_and_size(name, blocks, bottleneck):
    from cnnkit.models.timm_resnet import resnet

    model = resnet(name, (3, 224, 224), 1000)
    ours = {key: tuple(value.shape) for key, value in model.state_dict().items()
            if not key.endswith("num_batches_tracked")}
    assert ours == timm_keys(blocks, bottleneck)
    assert sum(parameter.numel() for parameter in model.parameters()) == PARAMETERS[name]
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 3, 64, 64)).shape == (2, 1000)  # any input size: global average pool


# ---------------------------------------------------------------------------------------------------------
# A Hugging Face cache written here


def put_blob(repo: Path, name: str, data: bytes, lfs: bool) -> None:
    """`data` stored as huggingface_hub stores it: blobs/<SHA-256 for LFS files, git SHA-1 for small ones>,
    linked from snapshots/COMMIT/<name>."""
    digest = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "blobs" / digest).write_bytes(data)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    (snapshot / name).symlink_to(f"../../blobs/{digest}")
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)


def write_repo(cache: Path, repo_id: str, architecture: str, *, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
               weights: bool = True) -> Path:
    from safetensors.torch import save

    from cnnkit.models.timm_resnet import resnet

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    config = {"architecture": architecture, "num_classes": 1000,
              "pretrained_cfg": {"mean": list(mean), "std": list(std), "input_size": [3, 224, 224]}}
    put_blob(repo, "config.json", json.dumps(config).encode(), lfs=False)
    if weights:
        torch.manual_seed(7)
        state = resnet(architecture, (3, 224, 224), 1000).state_dict()
        with torch.no_grad():
            for key, value in state.items():  # weights unlike a fresh network's, BatchNorm statistics included
                if value.is_floating_point():
                    value.uniform_(0.5, 1.0) if "running_var" in key else value.add_(0.01 * torch.randn_like(value))
        put_blob(repo, "model.safetensors", save({k: v.contiguous() for k, v in state.items()}), lfs=True)
    return repo


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    write_repo(cache, "timm/resnet18.a1_in1k", "resnet18")  # resnet18's `imagenet` source
    write_repo(cache, "timm/resnet50.a1_in1k", "resnet50")
    write_repo(cache, "acme/resnet18-no-weights", "resnet18", weights=False)
    write_repo(cache, "acme/resnet18-bad-std", "resnet18", std=(0.2, 0.0, 0.2))
    damaged = write_repo(cache, "acme/resnet18-damaged", "resnet18")
    blob = (damaged / "snapshots" / COMMIT / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight: the file still parses
    blob.write_bytes(bytes(data))
    return cache


def cnnkit(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(cache.parent / "hf-home")}
    return run_cnnkit(*args, timeout=600, env=env)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mnist").symlink_to(SHARED_DATA / "mnist")
    return data


def test_resnet18_trains_from_the_hub_cache_offline_with_its_normalisation_and_provenance(hub, data_dir, tmp_path):
    """`--pretrained imagenet` for resnet18 is timm/resnet18.a1_in1k, read from the Hub's cache: its weights land
    in the network (a frozen backbone keeps them bit for bit), its config.json's normalisation is the model's,
    and model.json names the repository, its commit and the file's SHA-256."""
    from safetensors.torch import load_file

    result = cnnkit(hub, "train", "--dataset", "mnist", "--data-dir", str(data_dir), "--limit-train", "256",
                    "--limit-eval", "128", "--epochs", "2", "--model", "resnet18", "--pretrained", "imagenet",
                    "--model-kwargs", '{"resolution": 64}', "--freeze", "backbone", "--quiet", "--no-checkpoint",
                    "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "runs" / "train"
    meta = json.loads((run / "model.json").read_text())
    snapshot = hub / "models--timm--resnet18.a1_in1k" / "snapshots" / COMMIT / "model.safetensors"
    source = meta["weights_from"]
    assert source["source"] == f"hf-hub:timm/resnet18.a1_in1k@{COMMIT}"
    assert source["original_sha256"] == snapshot.resolve().name == hashlib.sha256(snapshot.read_bytes()).hexdigest()
    assert meta["preprocessing"]["mean"] == [127.5] and meta["preprocessing"]["std"] == [63.75]  # 0.5, 0.25 of 255
    hub_state, saved = load_file(str(snapshot)), load_file(str(run / "model.safetensors"))
    backbone = [key for key in hub_state if not key.startswith("fc.") and not key.endswith("num_batches_tracked")]
    assert len(backbone) == 100 and all(torch.equal(saved[f"body.{key}"], hub_state[key]) for key in backbone)
    assert saved["body.fc.weight"].shape == (10, 512)  # a new head for MNIST's 10 classes


@pytest.mark.parametrize("model, source, error", [
    ("resnet18", "hf-hub:acme/resnet18-damaged", "model.safetensors hashes to .* not the .* the Hub recorded for "
                                                 "it \\(a damaged download\\): delete .*blobs/"),
    ("resnet18", "hf-hub:acme/resnet18-no-weights", "model.safetensors is not in the Hugging Face cache and the Hub "
                                                    "cannot be reached .*`hf download acme/resnet18-no-weights"),
    ("resnet18", "hf-hub:timm/resnet50.a1_in1k", "the repository holds 'resnet50' weights, not resnet18: --model "
                                                 "resnet50"),
    ("resnet18", "hf-hub:acme/resnet18-bad-std", "config.json's pretrained_cfg.std is not three values from 0 to 1"),
    ("resnet34", "imagenet", "hf-hub:timm/resnet34.a1_in1k: model.safetensors is not in the Hugging Face cache"),
])
def test_a_hub_source_that_cannot_be_used_is_one_line(hub, data_dir, tmp_path, model, source, error):
    result = cnnkit(hub, "train", "--dataset", "mnist", "--data-dir", str(data_dir), "--limit-train", "64",
                    "--limit-eval", "32", "--epochs", "1", "--model", model, "--pretrained", source,
                    "--runs-dir", str(tmp_path / "runs"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert re.search(error, lines[0]), lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_unreachable_hub_is_one_line_without_huggingface_hubs_retry_warnings(tmp_path, monkeypatch, capfd):
    """Where the Hub cannot be reached (here: a closed port on 127.0.0.1), huggingface_hub retries 5 times and
    said so in 12 warning lines before cnnkit's one line. Its waits between retries are skipped here."""
    import socket

    import huggingface_hub.utils._http as hub_http
    from huggingface_hub import constants

    from cnnkit.errors import CnnkitError
    from cnnkit.models.pretrained import hub_file

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"  # both: huggingface_hub builds a file's address from the template
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)
    attempts, session = [], hub_http.get_session

    def watched_session():  # huggingface_hub's own client, its requests' addresses noted
        client = session()
        request = client.request

        def noted(method, url, **kwargs):
            attempts.append(str(url))
            return request(method, url, **kwargs)
        client.request = noted
        return client
    monkeypatch.setattr(hub_http, "get_session", watched_session)
    capfd.readouterr()
    with pytest.raises(CnnkitError, match="config.json is not in the Hugging Face cache and the Hub cannot be reached"):
        hub_file("timm/resnet18.a1_in1k", "config.json", None, "--pretrained hf-hub:timm/resnet18.a1_in1k")
    assert capfd.readouterr().err == ""
    assert len(attempts) > 5 and all(url.startswith(endpoint + "/") for url in attempts)  # retried, never elsewhere

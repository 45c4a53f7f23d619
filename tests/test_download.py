"""Downloads against a real local HTTP server: good transfers, bad checksums, cut connections, no-network reuse."""

from __future__ import annotations

import gzip
import http.server
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cnnkit.data.download import data_root, dataset_present, fetch_dataset, verify_file
from cnnkit.data.registry import DATASETS, DatasetSpec, FileSpec, get_spec
from cnnkit.data.sources import load_raw
from cnnkit.errors import CnnkitError

MNIST = get_spec("mnist")
LABELS = MNIST.files["train_labels"]


def _single_file_spec(urls: tuple[str, ...], file: FileSpec = LABELS) -> DatasetSpec:
    """A one-file dataset, so a failed download can be checked to leave literally nothing behind."""
    return DatasetSpec(
        name="tiny",
        kind="idx",
        files={"train_labels": FileSpec(file.filename, urls, file.md5, file.content_sha256)},
        classes=MNIST.classes,
        shape=MNIST.shape,
        description="one MNIST file",
    )


def _copy_folder(source: Path, target: Path) -> None:
    """Copy files without their read-only permissions (the shared data is read-only)."""
    target.mkdir(parents=True)
    for path in source.iterdir():
        shutil.copyfile(path, target / path.name)


def _all_entries(folder: Path) -> list[str]:
    """Every name under `folder`, hidden temp files included."""
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*")) if folder.exists() else []


class _CutHandler(http.server.BaseHTTPRequestHandler):
    """Announce the full Content-Length, send half of the file, then close the connection."""

    def __init__(self, *args, directory: str, log: list[str], **kwargs) -> None:
        self.directory, self.log = directory, log
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self.log.append(self.path)
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


class _StallHandler(_CutHandler):
    """Send the headers and a little data, then go silent (a hung server)."""

    def do_GET(self) -> None:
        self.log.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        self.wfile.write(b"\0" * 1000)
        self.wfile.flush()
        time.sleep(3)


@pytest.fixture
def altered_mirror(tmp_path: Path, shared_data: Path) -> Path:
    """A copy of the mnist mirror folder whose train labels have one label changed (valid gzip, wrong data)."""
    served = tmp_path / "served"
    _copy_folder(shared_data / "mnist", served / "mnist")
    labels_path = served / "mnist" / LABELS.filename
    content = bytearray(gzip.decompress(labels_path.read_bytes()))
    content[8] = (content[8] + 1) % 10
    labels_path.write_bytes(gzip.compress(bytes(content), mtime=0))
    return served


# ---------------------------------------------------------------------------------------------------------
# Good downloads


def test_mirror_download_is_verified_and_byte_identical(tmp_path: Path, shared_data: Path, http_mirror) -> None:
    mirror = http_mirror(shared_data)
    root = tmp_path / "data"
    folder = fetch_dataset(MNIST, root, mirror=mirror.url, progress=False)
    assert folder == root / "mnist"
    for file in MNIST.files.values():
        assert (folder / file.filename).read_bytes() == (shared_data / "mnist" / file.filename).read_bytes()
        assert verify_file(folder / file.filename, file) is None
    assert sorted(mirror.requests) == sorted(f"/mnist/{f.filename}" for f in MNIST.files.values())
    assert _all_entries(folder) == sorted(f.filename for f in MNIST.files.values())  # no temp files left


def test_env_mirror_then_load(tmp_path: Path, shared_data: Path, http_mirror, monkeypatch) -> None:
    mirror = http_mirror(shared_data)
    monkeypatch.setenv("CNNKIT_MIRROR", mirror.url + "/")
    data = load_raw("fashion-mnist", tmp_path, progress=False)
    assert len(mirror.requests) == 4
    assert data.train[0].shape == (60000, 1, 28, 28) and data.test[0].shape == (10000, 1, 28, 28)
    assert data.train[1].dtype == np.int64 and data.classes[0] == "T-shirt/top"


def test_progress_bar_download(tmp_path: Path, shared_data: Path, http_mirror) -> None:
    """The rich adapter satisfies pooch's progress-bar protocol (total, update, reset, close)."""
    mirror = http_mirror(shared_data / "mnist")
    spec = _single_file_spec((f"{mirror.url}/{LABELS.filename}",))
    fetch_dataset(spec, tmp_path, progress=True)
    assert (tmp_path / "tiny" / LABELS.filename).is_file()


def test_next_url_after_a_404(tmp_path: Path, shared_data: Path, http_mirror) -> None:
    mirror = http_mirror(shared_data / "mnist")
    spec = _single_file_spec((f"{mirror.url}/missing/{LABELS.filename}", f"{mirror.url}/{LABELS.filename}"))
    fetch_dataset(spec, tmp_path, progress=False)
    assert len(mirror.requests) == 2
    assert _all_entries(tmp_path / "tiny") == [LABELS.filename]


def test_local_folder_as_mirror(tmp_path: Path, shared_data: Path) -> None:
    fetch_dataset(MNIST, tmp_path, mirror=str(shared_data), progress=False)
    assert dataset_present(MNIST, tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Failures leave nothing behind


def test_checksum_mismatch_leaves_nothing(tmp_path: Path, altered_mirror: Path, http_mirror) -> None:
    mirror = http_mirror(altered_mirror)
    root = tmp_path / "data"
    with pytest.raises(CnnkitError) as caught:
        fetch_dataset(MNIST, root, mirror=mirror.url, progress=False)
    message = str(caught.value)
    assert message.startswith(f"checksum mismatch for {mirror.url}/mnist/{LABELS.filename}: expected md5 {LABELS.md5}")
    assert "\n" not in message
    # the images file before it verified and stays; the bad labels file and its temp file are gone
    assert _all_entries(root / "mnist") == [MNIST.files["train_images"].filename]


def test_checksum_mismatch_of_only_file_leaves_no_folder(tmp_path: Path, altered_mirror: Path, http_mirror) -> None:
    mirror = http_mirror(altered_mirror / "mnist")
    spec = _single_file_spec((f"{mirror.url}/{LABELS.filename}",))
    root = tmp_path / "data"
    root.mkdir()
    with pytest.raises(CnnkitError, match="checksum mismatch"):
        fetch_dataset(spec, root, progress=False)
    assert _all_entries(root) == []


def test_connection_cut_mid_file(tmp_path: Path, shared_data: Path, http_mirror) -> None:
    mirror = http_mirror(shared_data, handler=_CutHandler)
    root = tmp_path / "data"
    started = time.perf_counter()
    with pytest.raises(CnnkitError) as caught:
        fetch_dataset(MNIST, root, mirror=mirror.url, progress=True)
    assert time.perf_counter() - started < 10
    message = str(caught.value)
    first = MNIST.files["train_images"].filename
    assert message.startswith(f"download of {mirror.url}/mnist/{first} failed:") and "\n" not in message
    assert _all_entries(root) == []


def test_stalled_server_times_out(tmp_path: Path, shared_data: Path, http_mirror, monkeypatch) -> None:
    monkeypatch.setattr("cnnkit.data.download.TIMEOUT_S", 0.5)
    mirror = http_mirror(shared_data, handler=_StallHandler)
    started = time.perf_counter()
    with pytest.raises(CnnkitError, match="timed out"):
        fetch_dataset(MNIST, tmp_path, mirror=mirror.url, progress=False)
    assert time.perf_counter() - started < 2.5
    assert _all_entries(tmp_path) == []


def test_unreachable_server(tmp_path: Path) -> None:
    spec = _single_file_spec(("http://127.0.0.1:9/nothing.gz",))  # discard port: connection refused
    with pytest.raises(CnnkitError, match=r"download of http://127\.0\.0\.1:9/nothing\.gz failed"):
        fetch_dataset(spec, tmp_path, progress=False)
    assert _all_entries(tmp_path) == []


def test_last_error_is_reported_after_all_urls_fail(tmp_path: Path, shared_data: Path, http_mirror) -> None:
    mirror = http_mirror(shared_data / "mnist")
    spec = _single_file_spec(("http://127.0.0.1:9/a.gz", f"{mirror.url}/missing.gz"))
    with pytest.raises(CnnkitError, match=r"missing\.gz failed: HTTP 404 .*\(tried 2 sources"):
        fetch_dataset(spec, tmp_path, progress=False)


# ---------------------------------------------------------------------------------------------------------
# Present data: no network at all


def test_present_dataset_makes_no_request(tmp_path: Path, shared_data: Path, http_mirror) -> None:
    _copy_folder(shared_data / "mnist", tmp_path / "mnist")
    mirror = http_mirror(shared_data)
    assert dataset_present(MNIST, tmp_path)
    assert fetch_dataset(MNIST, tmp_path, mirror=mirror.url) == tmp_path / "mnist"
    data = load_raw("mnist", tmp_path, mirror=mirror.url, progress=False)
    assert mirror.requests == []
    assert data.train[1][0] == 5 and data.classes == [str(d) for d in range(10)]


def test_shared_folder_loads_offline(shared_data: Path) -> None:
    started = time.perf_counter()
    data = load_raw("mnist", shared_data, download=False, mirror="http://127.0.0.1:9")
    assert time.perf_counter() - started < 2
    assert data.train[0].shape == (60000, 1, 28, 28) and data.train[0].flags.c_contiguous
    assert data.test is not None and data.test[0].shape == (10000, 1, 28, 28)


def test_missing_dataset_without_download(tmp_path: Path) -> None:
    with pytest.raises(CnnkitError, match="run `cnnkit datasets download kmnist` or pass --data-dir"):
        load_raw("kmnist", tmp_path, download=False)


# ---------------------------------------------------------------------------------------------------------
# Registry and data root


def test_registry_entries_are_complete() -> None:
    assert set(DATASETS) == {"mnist", "fashion-mnist", "kmnist", "cifar10", "cifar100"}
    for spec in DATASETS.values():
        assert spec.files and all(file.urls and file.md5 for file in spec.files.values())
    assert len(DATASETS["cifar100"].classes) == 100 and len(set(DATASETS["cifar100"].classes)) == 100
    assert DATASETS["cifar100"].classes[:3] == ("apple", "aquarium_fish", "baby")
    assert get_spec("MNIST") is DATASETS["mnist"]


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(CnnkitError, match="unknown dataset 'mnsit'; known datasets: mnist, fashion-mnist"):
        get_spec("mnsit")


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_CACHE_HOME is the Linux cache location")
def test_data_root_precedence(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CNNKIT_DATA", str(tmp_path / "env"))
    assert data_root(tmp_path / "arg") == tmp_path / "arg"
    assert data_root(None) == tmp_path / "env"
    monkeypatch.delenv("CNNKIT_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_root(None) == tmp_path / "xdg" / "cnnkit"

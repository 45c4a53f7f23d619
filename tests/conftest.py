"""Shared fixtures: where the real test data lives, and a real local HTTP mirror serving a folder."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slices import SHARED_DATA

#: Test processes run at once (pytest-xdist, `-n auto` in pyproject.toml): one per core, at most this many. The
#: heaviest tests peak at a few GiB each (frozen-backbone features, the streamed folder), so more would trade
#: memory for little time.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, the cores are shared out between the workers, for their own torch and for every
    process a test starts (OMP_NUM_THREADS, which torch's default thread count follows). Left alone, two workers
    on two cores run two OpenMP teams of two that spin while waiting for each other: the suite measured 675 s
    with `-n 2` like that, 498 s with one thread a worker, 827 s on one worker (2-core AMD EPYC)."""
    worker_count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker_count > 1:
        threads = max(1, (os.cpu_count() or 1) // worker_count)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        import torch

        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only folder of real datasets (mnist/, fashion-mnist/, cifar10-jpg.tar.gz)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


@dataclass
class Mirror:
    """A running local HTTP server: its base URL and the paths it was asked for."""

    url: str
    requests: list[str] = field(default_factory=list)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serve files from `directory`, record each request path, keep the test output clean."""

    def __init__(self, *args, log: list[str], **kwargs) -> None:
        self._log = log
        super().__init__(*args, **kwargs)

    def send_head(self):
        self._log.append(self.path)
        return super().send_head()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - base class signature
        pass


@pytest.fixture
def http_mirror() -> Iterator[Callable[..., Mirror]]:
    """Start `http_mirror(directory)` servers on 127.0.0.1 (optionally with a custom handler class)."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(directory: Path, handler: type[http.server.BaseHTTPRequestHandler] | None = None) -> Mirror:
        mirror = Mirror(url="")
        handler_class = functools.partial(handler or _QuietHandler, directory=str(directory), log=mirror.requests)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
        return mirror

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def mount_tmpfs(tmp_path) -> Iterator[Callable[..., Path]]:
    """`mount_tmpfs(name, size, read_only=False)`: a real tmpfs under tmp_path, unmounted afterwards."""
    mounted: list[Path] = []

    def mount(name: str, size: str, read_only: bool = False) -> Path:
        path = tmp_path / name
        path.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0777", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): needs root")
        mounted.append(path)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)

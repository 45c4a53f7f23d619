"""Shared fixtures: where the real test data lives, and a real local HTTP mirror serving a folder."""

from __future__ import annotations

import functools
import http.server
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slices import SHARED_DATA


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

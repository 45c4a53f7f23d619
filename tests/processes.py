"""Run a `cnnkit` command as its own process, the way every test does: `run_cnnkit(*args)`.

A command runs as `python -m cnnkit ARGS` would, with its output captured as text. Where it can, it is forked
from a server that has already imported torch (`zygote.py`, one per test worker), which saves the 1-2.5 s each
command spends importing torch; the command is still a process of its own that imports cnnkit from scratch.
It is started the plain way (`subprocess.run`) when the server would not match a fresh interpreter: a wrapper
program (`prefix`), or an environment that differs from the server's in a variable read at start-up (Python's,
the locale's, the thread libraries'). `CNNKIT_TEST_FORK=0` starts every command the plain way.
"""

from __future__ import annotations

import atexit
import json
import locale
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

ZYGOTE = Path(__file__).with_name("zygote.py")

#: Environment variables read when an interpreter (or torch, numpy, OpenMP) starts: a command whose environment
#: differs from the server's in one of these starts the plain way.
STARTUP_PREFIXES = ("PYTHON", "LC_", "LANG", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "GOMP_", "LD_", "MALLOC",
                    "TORCH_", "PYTORCH", "CUDA", "NUMPY")


class _Zygote:
    """The fork server of this test process, started at its first command and ended with this process."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="cnnkit-zygote-")
        self.address = os.path.join(self.folder, "socket")
        self.environment = dict(os.environ)
        self.process = subprocess.Popen([sys.executable, str(ZYGOTE), self.address], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=self.environment)
        atexit.register(self.close)
        answer = self.process.stdout.readline()
        if answer not in (b"ready\n", b"unsupported\n"):
            raise RuntimeError(f"{ZYGOTE.name} did not start (exit status {self.process.wait()})")
        self.forks = answer == b"ready\n"  # not where the kernel lacks pidfd_open (before Linux 5.3)

    def serves(self, env: Mapping[str, str]) -> bool:
        def startup(environment: Mapping[str, str]) -> dict[str, str]:
            return {key: value for key, value in environment.items() if key.startswith(STARTUP_PREFIXES)}

        return self.forks and self.process.poll() is None and startup(env) == startup(self.environment)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


_zygote: _Zygote | None = None
_starting = threading.Lock()


def _server() -> _Zygote | None:
    global _zygote
    if os.environ.get("CNNKIT_TEST_FORK", "1") == "0" or not hasattr(os, "pidfd_open"):
        return None
    with _starting:
        if _zygote is None:
            _zygote = _Zygote()
    return _zygote


def _decode(data: bytes) -> str:
    """What `subprocess.run(..., text=True)` gives: the locale's encoding and universal newlines."""
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


def _read_all(fd: int, into: list[bytes]) -> threading.Thread:
    def read() -> None:
        with os.fdopen(fd, "rb") as pipe:
            into.append(pipe.read())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _forked(zygote: _Zygote, command: list[str], args: Sequence[str], env: Mapping[str, str], cwd: str,
            timeout: float | None, input: str | None) -> subprocess.CompletedProcess[str]:
    stdout_read, stdout_write = os.pipe()
    stderr_read, stderr_write = os.pipe()
    stdin_read, stdin_write = os.pipe()
    outputs: tuple[list[bytes], list[bytes]] = ([], [])
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        connection.connect(zygote.address)
        request = json.dumps({"args": list(args), "cwd": cwd, "env": dict(env)}).encode()
        socket.send_fds(connection, [request], [stdin_read, stdout_write, stderr_write])
        for fd in (stdin_read, stdout_write, stderr_write):
            os.close(fd)
        readers = [_read_all(stdout_read, outputs[0]), _read_all(stderr_read, outputs[1])]
        with os.fdopen(stdin_write, "wb") as stdin:
            try:
                stdin.write((input or "").encode())
            except BrokenPipeError:
                pass
        pid = json.loads(connection.recv(4096))["pid"]
        connection.settimeout(timeout)
        try:
            returncode = json.loads(connection.recv(4096))["returncode"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            connection.settimeout(None)
            connection.recv(4096)
            for reader in readers:
                reader.join(timeout=10)
            raise subprocess.TimeoutExpired(command, timeout, b"".join(outputs[0]), b"".join(outputs[1])) from None
    for reader in readers:
        reader.join()
    return subprocess.CompletedProcess(command, returncode, _decode(b"".join(outputs[0])),
                                       _decode(b"".join(outputs[1])))


def run_cnnkit(*args: str, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
               timeout: float | None = 300, input: str | None = None, prefix: Sequence[str] = (),
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """`subprocess.run([*prefix, sys.executable, "-m", "cnnkit", *args], capture_output=True, text=True, ...)`."""
    command = [*prefix, sys.executable, "-m", "cnnkit", *args]
    environment = dict(os.environ if env is None else env)
    zygote = None if prefix else _server()
    if zygote is None or not zygote.serves(environment):
        return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=cwd, timeout=timeout,
                              input=input, check=check)
    result = _forked(zygote, command, args, environment, os.fspath(cwd or os.getcwd()), timeout, input)
    if check:
        result.check_returncode()
    return result

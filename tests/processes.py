"""Run a `cnnkit` command as its own process, the way every test does: `run_cnnkit(*args)` to its end, or
`start_cnnkit(*args)` to signal or read it while it runs (what `subprocess.Popen` gives).

A command runs as `python -m cnnkit ARGS` would, with its output captured as text. Where it can, it is forked
from a server that has already imported torch (`zygote.py`, one per test worker), which saves the time each
command spent importing it (a training the most, as its first step imports torch._dynamo); the command is still
a process of its own that imports cnnkit from scratch. It is started the plain way (`subprocess.run`) where the
server would not be the same as a fresh interpreter: a wrapper program (`prefix`), an environment that differs
from the server's in a variable read at start-up (Python's, the locale's, the C library's, torch's and the thread
libraries'; TORCHINDUCTOR_CACHE_DIR, set by torch in a test process and read when compiling, is not one), a
working folder that does not exist, or a request the server declines. `CNNKIT_TEST_FORK=0` starts every command
the plain way."""

from __future__ import annotations

import atexit
import contextlib
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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ZYGOTE = Path(__file__).with_name("zygote.py")

#: Environment variables read when an interpreter (or torch, numpy, OpenMP) starts: a command whose environment
#: differs from the server's in one of these starts the plain way.
STARTUP_PREFIXES = ("PYTHON", "LC_", "LANG", "OMP_", "KMP_", "MKL_", "OPENBLAS_", "GOMP_", "LD_", "MALLOC",
                    "GLIBC_", "TORCH_", "TORCHDYNAMO", "PYTORCH", "CUDA", "NUMPY", "NPY_")


def _startup(environment: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in environment.items() if key.startswith(STARTUP_PREFIXES)}


class _Zygote:
    """The fork server of this test process, started at its first command and ended with this process."""

    def __init__(self) -> None:
        self.folder = tempfile.mkdtemp(prefix="cnnkit-zygote-")
        self.address = os.path.join(self.folder, "socket")
        self.environment = dict(os.environ)
        self.startup = _startup(self.environment)
        self.process = subprocess.Popen([sys.executable, str(ZYGOTE), self.address], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=self.environment)
        atexit.register(self.close)
        answer = self.process.stdout.readline()
        if answer not in (b"ready\n", b"unsupported\n"):
            raise RuntimeError(f"{ZYGOTE.name} did not start (exit status {self.process.wait()})")
        self.forks = answer == b"ready\n"  # not where the kernel lacks pidfd_open (before Linux 5.3)

    def serves(self, env: Mapping[str, str]) -> bool:
        return self.forks and self.process.poll() is None and _startup(env) == self.startup

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


def _request(zygote: _Zygote, args: list[str], env: Mapping[str, str], cwd: str, fds: list[int],
             session: bool = False) -> tuple[socket.socket, int] | None:
    """Ask `zygote` to fork `args` with `fds` as its stdin, stdout and stderr (closed here either way): the open
    connection, on which its exit status will come, and its pid; None if the server declined the request (one too
    big for a message, a server gone), for the caller to start it the plain way."""
    request = json.dumps({"args": args, "cwd": cwd, "env": dict(env), "umask": _umask(), "session": session}).encode()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        connection.connect(zygote.address)
        socket.send_fds(connection, [request], fds)
        answer = connection.recv(4096)  # {"pid": N}, or nothing from a server that declined
    except OSError:
        answer = b""
    finally:
        for fd in fds:
            os.close(fd)
    if not answer:
        connection.close()
        return None
    return connection, json.loads(answer)["pid"]


def _forked(zygote: _Zygote, command: list[str], args: list[str], env: Mapping[str, str], cwd: str,
            timeout: float | None, input: str | None) -> subprocess.CompletedProcess[str] | None:
    """Run the command forked from `zygote`, as subprocess.run would; None if the server declined it."""
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    stdout_read, stdout_write = os.pipe()
    stderr_read, stderr_write = os.pipe()
    stdin_read, stdin_write = os.pipe()
    started = _request(zygote, args, env, cwd, [stdin_read, stdout_write, stderr_write])
    if started is None:
        for fd in (stdout_read, stderr_read, stdin_write):
            os.close(fd)
        return None
    connection, pid = started
    with connection:
        ended = False
        outputs: tuple[list[bytes], list[bytes]] = ([], [])
        readers = [_read_all(stdout_read, outputs[0]), _read_all(stderr_read, outputs[1])]
        try:
            with os.fdopen(stdin_write, "wb") as stdin, contextlib.suppress(BrokenPipeError):
                stdin.write((input or "").encode())
            connection.settimeout(left())
            try:
                returncode, ended = json.loads(connection.recv(4096))["returncode"], True
                for reader in readers:
                    reader.join(left())  # a process it started may hold the output open after it ended
                if any(reader.is_alive() for reader in readers):
                    raise TimeoutError
            except TimeoutError:
                raise subprocess.TimeoutExpired(command, timeout, b"".join(outputs[0]),
                                                b"".join(outputs[1])) from None
        finally:
            if not ended:  # timed out, or this test failed or was interrupted meanwhile: the command goes too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                connection.settimeout(30)
                with contextlib.suppress(OSError):
                    connection.recv(4096)  # the server has reaped it
    return subprocess.CompletedProcess(command, returncode, _decode(b"".join(outputs[0])),
                                       _decode(b"".join(outputs[1])))


class Started:
    """A command forked from the server and still running, with what the tests use of `subprocess.Popen(...,
    text=True)`: pid, stdout and stderr (text streams where PIPE was asked for), poll, wait, communicate,
    send_signal, terminate, kill and returncode. Its exit status comes from the server, which reaps it."""

    def __init__(self, command: list[str], connection: socket.socket, pid: int, stdout: int | None,
                 stderr: int | None) -> None:
        self.args, self.pid, self.returncode = command, pid, None
        self._connection = connection
        encoding = locale.getpreferredencoding(False)  # what Popen's text mode reads with
        self.stdout = None if stdout is None else os.fdopen(stdout, "r", encoding=encoding)
        self.stderr = None if stderr is None else os.fdopen(stderr, "r", encoding=encoding)
        self._readers: list[tuple[threading.Thread, list[str]]] | None = None

    def _ended(self, timeout: float | None) -> bool:
        if self.returncode is None:
            self._connection.settimeout(timeout)  # 0: a look without waiting
            try:
                message = self._connection.recv(4096)
            except (TimeoutError, BlockingIOError):
                return False
            if not message:
                raise RuntimeError(f"the fork server ended before {self.args} did")
            self.returncode = json.loads(message)["returncode"]
            self._connection.close()
        return True

    def poll(self) -> int | None:
        self._ended(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Read stdout and stderr to their ends and wait, as Popen.communicate (a second call goes on reading)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._readers is None:
            self._readers = []
            for stream in (self.stdout, self.stderr):
                if stream is not None:
                    into: list[str] = []
                    thread = threading.Thread(target=_read_to_end, args=(stream, into), daemon=True)
                    thread.start()
                    self._readers.append((thread, into))
        for thread, _ in self._readers:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        texts = iter("".join(into) for _, into in self._readers)
        return (None if self.stdout is None else next(texts)), (None if self.stderr is None else next(texts))

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:  # as Popen: no signal once it is known to have ended
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _read_to_end(stream, into: list[str]) -> None:
    """What Popen.communicate does with each stream: read it to its end, then close it."""
    with stream:
        into.append(stream.read())


def _output_ends(choice: int, stdout_end: int | None) -> tuple[int | None, int]:
    """(the end this process reads or None, the end the command writes) for subprocess.PIPE, DEVNULL or STDOUT."""
    if choice == subprocess.PIPE:
        return os.pipe()
    if choice == subprocess.DEVNULL:
        return None, os.open(os.devnull, os.O_WRONLY)
    if choice == subprocess.STDOUT and stdout_end is not None:
        return None, os.dup(stdout_end)
    raise ValueError(f"start_cnnkit takes PIPE, DEVNULL or (for stderr) STDOUT, not {choice!r}")


def start_cnnkit(*args: str | os.PathLike, stdout: int = subprocess.PIPE, stderr: int = subprocess.PIPE,
                 env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
                 start_new_session: bool = False) -> subprocess.Popen[str] | Started:
    """`subprocess.Popen([sys.executable, "-m", "cnnkit", *args], stdin=DEVNULL, text=True, ...)`, forked from
    the server where `run_cnnkit` would be (a `Started`), else that Popen."""
    command = [sys.executable, "-m", "cnnkit", *map(os.fspath, args)]
    environment = dict(os.environ if env is None else env)
    directory = os.path.abspath(os.getcwd() if cwd is None else cwd)
    zygote = None if not os.path.isdir(directory) else _server()
    if zygote is not None and zygote.serves(environment):
        stdout_read, stdout_write = _output_ends(stdout, None)
        stderr_read, stderr_write = _output_ends(stderr, stdout_write)
        started = _request(zygote, command[3:], environment, directory,
                           [os.open(os.devnull, os.O_RDONLY), stdout_write, stderr_write], start_new_session)
        if started is not None:
            return Started(command, *started, stdout_read, stderr_read)
        for fd in (stdout_read, stderr_read):
            if fd is not None:
                os.close(fd)
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, text=True,
                            env=environment, cwd=cwd, start_new_session=start_new_session)


def _umask() -> int:
    """This process's umask, read without setting it (os.umask would change it for every thread meanwhile)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))


def run_cnnkit(*args: str | os.PathLike, env: Mapping[str, str] | None = None, cwd: str | os.PathLike | None = None,
               timeout: float | None = None, input: str | None = None, prefix: Sequence[str] = (),
               check: bool = False) -> subprocess.CompletedProcess[str]:
    """`subprocess.run([*prefix, sys.executable, "-m", "cnnkit", *args], capture_output=True, text=True, ...)`,
    with stdin empty unless `input` is given."""
    command = [*prefix, sys.executable, "-m", "cnnkit", *map(os.fspath, args)]
    environment = dict(os.environ if env is None else env)
    directory = os.path.abspath(os.getcwd() if cwd is None else cwd)
    zygote = None if prefix or not os.path.isdir(directory) else _server()
    result = None
    if zygote is not None and zygote.serves(environment):
        result = _forked(zygote, command, command[len(prefix) + 3:], environment, directory, timeout, input)
    if result is None:
        result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=cwd, timeout=timeout,
                                input=input, stdin=None if input is not None else subprocess.DEVNULL)
    if check:
        result.check_returncode()
    return result


def run_torchrun(*args: str | os.PathLike, processes: int = 2, timeout: float = 300,
                 env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m torch.distributed.run --standalone --nproc-per-node PROCESSES ARGS` to its end, output captured,
    each process on one thread (two sharing the cores), as a user's own torchrun launch is. Its logs go to
    os.devnull: by default the launcher leaves a torchelastic_* folder in the temporary folder each time."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               f"--log-dir={os.devnull}", *map(os.fspath, args)]
    environment = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment,
                          stdin=subprocess.DEVNULL)

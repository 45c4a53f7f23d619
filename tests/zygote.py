"""Test-only: a process that imports torch once and forks a `python -m cnnkit` for each command a test runs.

A `cnnkit` command spends a second or more importing torch, and a training more again importing `torch._dynamo`
at its first optimizer step (torch.optim's own imports); this server pays those imports once per test worker
(the time saved: benchmarks/RESULTS.md, "Ending a command"). Each command is still a process of its own (its own
pid, standard streams, working directory, environment, exit status and signals), forked from here and then
running cnnkit's `__main__` as `python -m cnnkit` would. cnnkit itself is not imported here, so every command
imports cnnkit's modules as a fresh process does. `processes.run_cnnkit` and `processes.start_cnnkit` are the
clients; they run a command the plain way where this server would not be the same (another interpreter start-up
environment, a wrapper program).

Protocol, over a SOCK_SEQPACKET Unix socket (one connection per command): the client sends one JSON message
(argv, cwd, env, umask, and whether the command starts a session of its own) with the command's stdin, stdout
and stderr as SCM_RIGHTS file descriptors; the server answers {"pid": N} once forked and {"returncode": N} when
the process has ended (negative: killed by a signal).
The server ends when its stdin (a pipe from the test worker) closes, killing the commands still running.
"""

from __future__ import annotations

import json
import multiprocessing.process
import os
import random
import selectors
import signal
import socket
import sys
import tempfile
import time

# What every cnnkit command imports before its work, and nothing of cnnkit's (third-party modules only).
import numpy
import PIL.Image  # noqa: F401 - imported for the children
import torch
import torch._dynamo  # noqa: F401 - imported for the children (torch.optim imports it at the first step)

MESSAGE_BYTES = 1 << 20


class Server:
    """The listening socket, the connections waiting for their command's end, and the selector over both."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(64)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, "parent")
        self.running: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, connection)

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                if key.data == "parent":
                    if not os.read(sys.stdin.fileno(), 4096):
                        self.stop()
                        return
                elif key.data == "accept":
                    self.start_command(*self.listener.accept())
                else:
                    self.end_command(key.fd)

    def start_command(self, connection: socket.socket, _address: object) -> None:
        """Fork the command a client asks for; a request that cannot be read closes its connection, and the
        client, finding no pid, starts the command the plain way."""
        fds: list[int] = []
        try:
            message, fds, _flags, _address = socket.recv_fds(connection, MESSAGE_BYTES, 3)
            request = json.loads(message)
        except (OSError, ValueError):
            for fd in fds:
                os.close(fd)
            connection.close()
            return
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            self.leave_to_child(connection)
            run_command(request, fds)  # never returns: the child exits as `python -m cnnkit` would
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.running[pidfd] = (pid, connection)
        self.selector.register(pidfd, selectors.EVENT_READ, "ended")
        try:
            connection.send(json.dumps({"pid": pid}).encode())
        except OSError:
            os.kill(pid, signal.SIGKILL)  # its client is gone: end_command reaps it

    def end_command(self, pidfd: int) -> None:
        pid, connection = self.running.pop(pidfd)
        self.selector.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        try:
            connection.send(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}).encode())
        except OSError:
            pass  # the client gave up waiting (its timeout killed the command)
        connection.close()

    def leave_to_child(self, connection: socket.socket) -> None:
        """Close what is the server's in the forked child, so the command holds none of its descriptors."""
        self.selector.close()
        self.listener.close()
        connection.close()
        for pidfd, (_pid, other) in self.running.items():
            os.close(pidfd)
            other.close()

    def stop(self) -> None:
        for pidfd, (pid, connection) in list(self.running.items()):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            connection.close()
            os.close(pidfd)


def run_command(request: dict, fds: list[int]) -> None:
    """In the forked child: become the process `python -m cnnkit ARGS` started in `cwd` with `env` would be.

    What a fresh process draws or reads at start-up is drawn or read again here: its random seeds (numpy's,
    torch's, Python's `random` and multiprocessing's key) and its environment's time zone, temporary folder and
    file-creation mask. Left as the server's: the seed of str hashes (fixed when an interpreter starts), and
    what the client does not differ in (`processes.STARTUP_PREFIXES`).
    """
    if request.get("session"):
        os.setsid()  # Popen's start_new_session
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    time.tzset()
    tempfile.tempdir = None  # importing torch._dynamo set it from the server's environment
    multiprocessing.process.ORIGINAL_DIR = os.getcwd()
    multiprocessing.current_process().authkey = os.urandom(32)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path[0] = os.getcwd()  # what `python -m` puts first
    sys.argv = ["-m", *request["args"]]  # runpy sets argv[0] to the module's file, as `python -m` does
    numpy.random.seed()
    torch.seed()
    random.seed()
    import runpy

    runpy.run_module("cnnkit", run_name="__main__", alter_sys=True)
    sys.exit(0)


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C of pytest reaches the commands; this ends on EOF
    try:
        os.close(os.pidfd_open(os.getpid()))  # Linux 5.3 and later
    except OSError:
        sys.stdout.write("unsupported\n")
        return
    try:
        server = Server(sys.argv[1])
    except OSError:  # a socket path too long for AF_UNIX (a long TMPDIR)
        sys.stdout.write("unsupported\n")
        return
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    server.serve()


if __name__ == "__main__":
    main()

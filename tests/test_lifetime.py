"""Worker processes die with their parent: a kill -9 of cnnkit leaves no decode worker behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# A real parent: it starts cnnkit's decode pool (2 processes), gives each a task that blocks, prints the
# workers' pids and waits, as cnnkit does while a big image folder is being decoded.
PARENT = """
import time
from cnnkit.data.parallel import choose_executor
executor = choose_executor(5000, 2)
futures = [executor.submit(time.sleep, 120) for _ in range(2)]
time.sleep(1)
print(" ".join(str(pid) for pid in executor._processes), flush=True)
time.sleep(120)
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"  # a zombie has died already
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signals are Linux's (prctl)")
def test_decode_workers_die_when_their_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        parent.send_signal(signal.SIGKILL)  # no handler in the parent can run
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in workers), "a worker outlived its parent"
    finally:
        parent.kill()
        for pid in workers if "workers" in locals() else []:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# A command's end: what Python's exit does that anyone can see (threads joined, atexit handlers, output flushed),
# but not the teardown that frees every module's objects (an object's __del__ at teardown never runs).
ENDING = """
import atexit, sys, threading, time
from cnnkit.lifetime import end_process

class FreedAtTeardown:
    def __del__(self):
        print("teardown", flush=True)

kept = FreedAtTeardown()
atexit.register(print, "atexit")
threading.Thread(target=lambda: (time.sleep(0.3), print("thread"))).start()
print("main")  # buffered: a pipe
sys.stdin.readline()  # the test may close its end of stdout first
end_process(int(sys.argv[1]), interrupted=sys.argv[2] == "1")
"""


@pytest.mark.parametrize("status, interrupted", [(3, False), (0, True)])
def test_a_command_ends_after_its_threads_atexit_handlers_and_output_but_without_teardown(status, interrupted):
    done = subprocess.run([sys.executable, "-c", ENDING, str(status), str(int(interrupted))], input="\n",
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["main", "thread", "atexit"] and done.stderr == ""
    assert done.returncode == (-signal.SIGINT if interrupted else status)


def test_a_command_whose_reader_left_ends_quietly_with_the_shells_sigpipe_status():
    buffered = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}  # as by default
    process = subprocess.Popen([sys.executable, "-c", ENDING, "0", "0"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=buffered)
    process.stdout.close()  # `cnnkit predict ... | head -1` once head has its line
    _, stderr = process.communicate("\n", timeout=60)
    assert process.returncode == 141 and stderr == ""


BUG = """
import cnnkit.cli

class FreedAtTeardown:
    def __del__(self):
        print("teardown", flush=True)

kept = FreedAtTeardown()

def main():
    raise ValueError("a bug")

cnnkit.cli.main = main
cnnkit.cli.console_main()
"""


def test_a_bug_in_a_command_prints_its_traceback_and_ends_with_status_1_without_teardown():
    """As Python ends on an uncaught exception, less the teardown, which in a data-parallel process stopped mid-step
    would free its model and deadlock (lifetime.keep_until_exit)."""
    done = subprocess.run([sys.executable, "-c", BUG], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("Traceback (most recent call last):") and done.stderr.endswith("ValueError: a bug\n")


def test_a_command_started_without_stdout_still_ends_with_its_own_status():
    """Python leaves sys.stdout None when fd 1 is closed at start (`cnnkit --version >&-`)."""
    done = subprocess.run([sys.executable, "-m", "cnnkit", "--version"], preexec_fn=lambda: os.close(1),
                          stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 0 and "Traceback" not in done.stderr  # argparse says the version on stderr then


def test_what_native_code_printed_is_flushed_as_c_exit_would():
    script = ("import ctypes, sys\nfrom cnnkit.lifetime import end_process\n"
              "ctypes.CDLL(None).printf(b'from C\\n')\nprint('from Python')\nend_process(0, interrupted=False)\n")
    buffered = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=buffered)
    assert done.returncode == 0 and sorted(done.stdout.splitlines()) == ["from C", "from Python"]

"""Load test of `cnnkit serve`: N concurrent clients on loopback for T seconds.

    python benchmarks/serve_load.py RUN [--clients 32] [--seconds 10] [--data-dir ../shared/data]

Starts the server for RUN in a subprocess on 127.0.0.1 (a free port), then drives it from this process
with `--clients` keep-alive connections, each posting a real test image of the run's dataset (multipart
PNG, what the page sends) and waiting for the answer before sending the next: a closed loop, so the
number of requests in flight never exceeds the number of clients. The run is bounded: at most
`--seconds` (capped at 120) after a 1 s warm-up, and at most `--max-requests` requests. Every answer is
checked against the one the same image got alone before the load started, so a batching mix-up counts
as an error. Prints requests/s, p50/p90/p99 latency, errors and the server's batching counters, and
writes them to benchmarks/RESULTS.md between the serve_load markers.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
START, END = "<!-- serve_load:start -->", "<!-- serve_load:end -->"
TARGET_P99_MS = 50.0
MAX_SECONDS = 120
MAX_CLIENTS = 256


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests in the window
    errors: dict[str, int] = field(default_factory=dict)
    measuring: bool = False

    def error(self, kind: str) -> None:
        if self.measuring:
            self.errors[kind] = self.errors.get(kind, 0) + 1


def start_server(run: Path, threads: int | None) -> tuple[subprocess.Popen, str, str]:
    """The server in a subprocess; (process, host, port) once it says where it listens."""
    code = ("import sys; from cnnkit.serve import serve; "
            "serve(sys.argv[1], '127.0.0.1', 0, 10, threads=int(sys.argv[2]) or None)")
    process = subprocess.Popen([sys.executable, "-u", "-c", code, str(run), str(threads or 0)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if match := re.search(r"at http://(127\.0\.0\.1):(\d+)/", line):
            return process, match[1], match[2]
    process.wait()
    raise SystemExit("the server did not start:\n" + "".join(output))


def test_images(run: Path, data_dir: Path, count: int) -> list[bytes]:
    """Up to `count` PNG files of the run's test set (random images of its input size if unavailable)."""
    from PIL import Image

    meta = json.loads((run / "model.json").read_text())
    spec = meta["input"]
    try:
        from cnnkit.data.tensors import load_test_split

        images = load_test_split(meta["dataset"], str(data_dir), limit=count, progress=False,
                                 download=False).test.images.numpy()
    except Exception as error:  # noqa: BLE001 - any dataset problem: fall back, and say so
        print(f"(no test images of {meta.get('dataset')} in {data_dir} ({error}); using random images)")
        images = np.random.default_rng(0).integers(0, 256, (count, spec["channels"], spec["height"],
                                                            spec["width"]), dtype=np.uint8)
    files = []
    for image in images:
        pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
        files.append(buffer.getvalue())
    return files


def request_bytes(host: str, port: str, png: bytes) -> bytes:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"digit.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
            f"boundary={boundary}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bytes]:
    """One request on a keep-alive connection: (status, body)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
    return status, await reader.readexactly(length)


async def get_json(host: str, port: str, path: str) -> dict:
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        _, body = await exchange(reader, writer, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        return json.loads(body)
    finally:
        writer.close()


async def client(host: str, port: str, requests: list[bytes], expected: list[str], tally: Tally,
                 offset: int, stop_at: float, budget: list[int]) -> None:
    loop = asyncio.get_running_loop()
    index = offset
    connection = None
    while loop.time() < stop_at and budget[0] > 0:
        budget[0] -= 1
        try:
            if connection is None:
                connection = await asyncio.open_connection(host, int(port))
            started = time.perf_counter()
            status, body = await asyncio.wait_for(exchange(*connection, requests[index]), timeout=30)
            latency = time.perf_counter() - started
            if status != 200:
                tally.error(f"HTTP {status}")
            elif json.loads(body)["label"] != expected[index]:
                tally.error("wrong answer")
            elif tally.measuring:
                tally.latencies.append(latency)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as error:
            tally.error(type(error).__name__)
            if connection is not None:
                connection[1].close()
            connection = None
        index = (index + 1) % len(requests)
    if connection is not None:
        connection[1].close()


async def drive(host: str, port: str, files: list[bytes], clients: int, seconds: float,
                max_requests: int, server_pid: int = 0) -> tuple[Tally, float, dict, dict]:
    requests = [request_bytes(host, port, png) for png in files]
    expected = []
    reader, writer = await asyncio.open_connection(host, int(port))
    for request in requests:  # each image alone first: the answer every later one must match
        status, body = await exchange(reader, writer, request)
        if status != 200:
            raise SystemExit(f"the server answered {status} to a test image: {body[:200]!r}")
        expected.append(json.loads(body)["label"])
    writer.close()

    loop = asyncio.get_running_loop()
    tally = Tally()
    budget = [max_requests]
    stop_at = loop.time() + 1.0 + seconds
    tasks = [asyncio.create_task(client(host, port, requests, expected, tally, (n * 7) % len(requests),
                                        stop_at, budget)) for n in range(clients)]
    await asyncio.sleep(1.0)  # warm-up: connections opened, caches warm; not counted
    before = await get_json(host, port, "/health")
    before["cpu"], before["client_cpu"] = cpu_seconds(server_pid), time.process_time()
    tally.measuring = True
    started = time.perf_counter()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    tally.measuring = False
    after = await get_json(host, port, "/health")
    after["cpu"], after["client_cpu"] = cpu_seconds(server_pid), time.process_time()
    return tally, elapsed, before, after


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc), or None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="run directory to serve")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32, at most 256)")
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds (default 10, at most 120)")
    parser.add_argument("--max-requests", type=int, default=200_000, help="stop after this many (default 200000)")
    parser.add_argument("--images", type=int, default=256, help="distinct test images sent (default 256)")
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: its own)")
    parser.add_argument("--data-dir", type=Path, default=SHARED / "data")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from mnist_speed import machine, write_results

    files = test_images(args.run, args.data_dir, args.images)
    gc.collect()
    gc.freeze()  # a full collection over torch's objects would pause this client for ~200 ms mid-measurement
    process, host, port = start_server(args.run, args.threads)
    try:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        tally, elapsed, before, after = asyncio.run(drive(host, port, files, args.clients, args.seconds,
                                                          args.max_requests, process.pid))
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()

    latencies_ms = [1000 * s for s in tally.latencies]
    errors = sum(tally.errors.values())
    served = after["requests"] - before["requests"]
    passes = after["forward_passes"] - before["forward_passes"]
    figures = {
        "requests": len(latencies_ms), "seconds": elapsed, "rps": len(latencies_ms) / elapsed,
        "p50": percentile(latencies_ms, 50), "p90": percentile(latencies_ms, 90),
        "p99": percentile(latencies_ms, 99), "max": max(latencies_ms, default=float("nan")),
        "mean": statistics.fmean(latencies_ms) if latencies_ms else float("nan"),
        "errors": errors, "batch": served / passes if passes else float("nan"), "largest": after["largest_batch"],
        "server_cpu_ms": (1000 * (after["cpu"] - before["cpu"]) / served
                          if served and after["cpu"] is not None and before["cpu"] is not None else float("nan")),
        "client_cpu_ms": 1000 * (after["client_cpu"] - before["client_cpu"]) / max(1, len(latencies_ms)),
    }
    verdict = "met" if errors == 0 and figures["p99"] <= TARGET_P99_MS else "NOT met"
    detail = ", ".join(f"{kind}: {n}" for kind, n in sorted(tally.errors.items())) or "none"
    meta = json.loads((args.run / "model.json").read_text())
    server_threads = args.threads or max(1, (os.cpu_count() or 2) // 2)  # cnnkit.serve's default
    header = ["clients", "seconds", "requests", "requests/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors",
              "mean batch", "largest batch", "server CPU ms / request", "load avg at start"]
    row = [str(args.clients), f"{elapsed:.1f}", str(figures["requests"]), f"{figures['rps']:.0f}",
           f"{figures['p50']:.1f}", f"{figures['p90']:.1f}", f"{figures['p99']:.1f}", f"{figures['max']:.1f}",
           str(errors), f"{figures['batch']:.1f}", str(figures["largest"]), f"{figures['server_cpu_ms']:.2f}",
           f"{load:.1f}"]
    table = "\n".join([
        "# Serving: `cnnkit serve` under load",
        "",
        f"Command: `python benchmarks/serve_load.py RUN --clients {args.clients} --seconds {args.seconds:g}`"
        f" ({time.strftime('%Y-%m-%d')}); RUN: {meta.get('architecture')} on {meta.get('dataset')}",
        f"Machine: {machine()}; server ({server_threads} torch thread{'s' if server_threads > 1 else ''}) "
        "and clients share it",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        "| " + " | ".join(row) + " |",
        "",
        f"Each client keeps one connection open and posts a real {meta.get('dataset')} test digit (multipart PNG,",
        "as the page sends) as soon as its previous answer arrives; latency is from sending the request to",
        "reading the whole answer. Errors count non-200 answers, connection failures and any answer that",
        "differs from the one the same image got alone. Mean batch: images per forward pass on the server.",
        "Server CPU ms / request: the server process's CPU time in the window divided by the images it",
        "answered (decode, forward pass, HTTP); the load average says how busy the machine already was.",
        f"Target: 0 errors and p99 <= {TARGET_P99_MS:g} ms at 32 clients: {verdict}"
        + ("." if args.clients == 32 else f" (measured at {args.clients} clients)."),
        "",
    ])
    print(f"{figures['requests']} requests in {elapsed:.1f} s from {args.clients} clients: "
          f"{figures['rps']:.0f} requests/s")
    print(f"latency p50 {figures['p50']:.1f} ms, p90 {figures['p90']:.1f} ms, p99 {figures['p99']:.1f} ms, "
          f"max {figures['max']:.1f} ms")
    print(f"errors: {errors} ({detail})")
    print(f"server: {served} images in {passes} forward passes (mean batch {figures['batch']:.1f}, "
          f"largest {figures['largest']})")
    print(f"CPU per request: server {figures['server_cpu_ms']:.2f} ms, load clients {figures['client_cpu_ms']:.2f} ms;"
          f" load average {load:.1f} on {os.cpu_count()} cores at the start")
    print(f"target (0 errors, p99 <= {TARGET_P99_MS:g} ms): {verdict}")
    if not args.no_write:
        write_results(args.output, table, START, END)
        print(f"written to {args.output}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

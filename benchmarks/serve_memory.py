"""Peak memory of `cnnkit serve` under concurrent uploads of large images, against an earlier cnnkit.

    python benchmarks/serve_memory.py RUN [--clients 30] [--megapixels 64] [--peer-src DIR]

Writes one 16-bit grayscale PNG of `--megapixels` (a constant image: ~140 kB on the wire, 128 MB once decoded),
starts `cnnkit serve RUN` on 127.0.0.1 and posts it from `--clients` threads at once, then reads the server's
peak resident memory (VmHWM). With `--peer-src` (the `src/` of another checkout, e.g. `git worktree add
/tmp/old e954154`) the same is measured for that code in the same invocation, so the two rows compare like for
like on one host. The server's pixel budget (serve/app.py, PixelBudget) is what bounds the peak: large images
wait for room instead of decoding all at once. Bounded: each request times out after 300 s.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def status_mib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith(field)).split()[1]) // 1024


def measure(src: Path, run: Path, image: bytes, clients: int) -> dict:
    """Serve `run` with the cnnkit in `src`, post `image` from `clients` threads at once; the figures."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "cnnkit", "serve", str(run), "--port", str(port)],
                              env={**os.environ, "PYTHONPATH": str(src)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        if "serving" not in server.stdout.readline():
            raise SystemExit(f"{src}: the server did not start: {server.stderr.read()[-2000:]}")
        idle = status_mib(server.pid, "VmRSS:")
        codes: list[int | str] = []

        def post() -> None:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=image, method="POST",
                                             headers={"Content-Type": "image/png"})
            try:
                with urllib.request.urlopen(request, timeout=300) as response:
                    codes.append(response.status)
            except urllib.error.HTTPError as error:
                codes.append(error.code)
            except OSError as error:
                codes.append(type(error).__name__)

        started = time.perf_counter()
        threads = [threading.Thread(target=post) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        return {"idle": idle, "peak": status_mib(server.pid, "VmHWM:"), "seconds": seconds,
                "answers": ", ".join(f"{codes.count(c)} x {c}" for c in sorted(set(codes), key=str))}
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--megapixels", type=float, default=64)
    parser.add_argument("--peer-src", type=Path, help="src/ of another cnnkit checkout, measured the same way")
    args = parser.parse_args()
    side = int((args.megapixels * 1e6) ** 0.5)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big16.png"
        Image.fromarray(np.full((side, side), 1000, np.uint16)).save(path)
        image = path.read_bytes()
    rows = [("this checkout", measure(ROOT / "src", args.run, image, args.clients))]
    if args.peer_src:
        rows.append((f"peer {args.peer_src}", measure(args.peer_src, args.run, image, args.clients)))
    print(f"{args.clients} concurrent uploads of a {side}x{side} 16-bit PNG ({len(image) / 1024:.0f} kB)\n")
    print("| server | idle MiB | peak MiB | peak - idle | all answered in s | answers |\n|---|---|---|---|---|---|")
    for name, row in rows:
        print(f"| {name} | {row['idle']:,} | {row['peak']:,} | {row['peak'] - row['idle']:,} | "
              f"{row['seconds']:.1f} | {row['answers']} |")
    if len(rows) == 2:
        ratio = (rows[1][1]["peak"] - rows[1][1]["idle"]) / max(1, rows[0][1]["peak"] - rows[0][1]["idle"])
        print(f"\nmemory above idle: the peer needs {ratio:.1f}x this checkout's")


if __name__ == "__main__":
    main()

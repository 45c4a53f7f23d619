"""`cnnkit serve`: a real uvicorn server in a subprocess on 127.0.0.1, driven over real HTTP.

The model is a real (short) MNIST training; the images are real MNIST test digits written as PNG files.
The helpers here (`mnist_run`, `start_server`, ...) are shared with test_browser.py.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from processes import run_cnnkit
from slices import SHARED_DATA

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------------------
# Shared helpers (also imported by test_browser.py)


def mnist_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real `cnnkit train` (1 epoch on 3,000 MNIST images), made once per test session."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA}")
    run_dir = tmp_path_factory.getbasetemp() / "serve-runs" / "mnist"
    if not (run_dir / "model.json").is_file():  # a run appears whole or not at all
        result = run_cnnkit("train", "--epochs", "1", "--limit-train", "3000", "--limit-eval", "500", "--data-dir",
                            str(SHARED_DATA), "--runs-dir", str(run_dir.parent), "--name", "mnist", "--quiet",
                            timeout=900)
        assert result.returncode == 0, result.stderr
    return run_dir


def rgb_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CIFAR-style run (3x32x32 RGB, no common background) with untrained weights and no metrics.json."""
    from cnnkit.models import build_model
    from cnnkit.preprocess import preprocessing_meta
    from cnnkit.runs import save_model

    run_dir = tmp_path_factory.getbasetemp() / "serve-runs" / "rgb"
    if not (run_dir / "model.json").is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        model = build_model("seed", (3, 32, 32), 4)
        sample = np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
        save_model(run_dir, model, {
            "architecture": "seed", "model_kwargs": {}, "classes": ["airplane", "automobile", "bird", "cat"],
            "dataset": "cifar-like", "input": {"channels": 3, "height": 32, "width": 32, "dtype": "uint8",
                                               "layout": "NCHW"},
            "preprocessing": preprocessing_meta(3, model.rescale.mean, model.rescale.std, sample)})
    return run_dir


def mnist_test_digits(count: int) -> tuple[np.ndarray, list[str]]:
    """The first `count` images (uint8 (N, 1, 28, 28)) and labels of the real MNIST test split."""
    from cnnkit.data.tensors import load_test_split

    test = load_test_split("mnist", str(SHARED_DATA), progress=False).test
    return test.images[:count].numpy(), [str(int(label)) for label in test.labels[:count]]


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (C, H, W) image as a PNG file's bytes."""
    pixels = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    output: list[str]


def start_server(run_dir: Path, max_upload_mb: float = 10, timeout: float = 120, prelude: str = "") -> Server:
    """`cnnkit.serve.serve(run_dir)` in a subprocess on 127.0.0.1, on a free port it reports when listening;
    `prelude`: Python run in that process first."""
    code = (f"{prelude}\nimport sys; from cnnkit.serve import serve; "
            "serve(sys.argv[1], '127.0.0.1', 0, float(sys.argv[2]), threads=1)")
    process = subprocess.Popen([sys.executable, "-u", "-c", code, str(run_dir), str(max_upload_mb)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def pump() -> None:  # keep reading so the server never blocks on a full pipe
        for line in process.stdout:
            output.append(line)
            if not url and (match := re.search(r"at (http://127\.0\.0\.1:\d+/)", line)):
                url.append(match[1])
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(timeout) or not url:
        process.kill()
        raise AssertionError("the server did not start:\n" + "".join(output))
    server = Server(url[0], process, output)
    deadline = time.monotonic() + 30
    while True:  # listening as soon as the URL is printed; make sure it answers
        try:
            if get_json(server, "health")["status"] == "ok":
                return server
        except OSError:
            if time.monotonic() > deadline:
                stop_server(server)
                raise
            time.sleep(0.1)


def stop_server(server: Server) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait()


def get_json(server: Server, path: str) -> dict:
    with urllib.request.urlopen(server.url + path, timeout=30) as response:
        return json.loads(response.read())


def post(server: Server, body: bytes, content_type: str, path: str = "predict") -> tuple[int, dict]:
    """(status, JSON body) of a POST; 4xx answers are returned, not raised."""
    request = urllib.request.Request(server.url + path, data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def multipart(data: bytes, filename: str = "digit.png", field: str = "file",
              content_type: str = "image/png") -> tuple[bytes, str]:
    """A multipart/form-data body with one file: (body, Content-Type header)."""
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def post_image(server: Server, data: bytes, **kwargs) -> tuple[int, dict]:
    return post(server, *multipart(data, **kwargs))


def test_explain_1_adds_the_heatmap_of_the_answer_and_other_values_are_a_400(server, digits, run_dir):
    """POST /predict?explain=1: the same answer plus a heatmap over the image the model saw, the one
    cnnkit.explain gives offline for the answered class."""
    import cnnkit
    from cnnkit.heatmaps import explain

    index = good_digit(digits)
    body, kind = multipart(digits["png"][index])
    plain = post(server, body, kind)[1]
    status, answer = post(server, body, kind, "predict?explain=1")
    assert status == 200, answer
    assert "explanation" not in plain and {key: answer[key] for key in plain} == plain
    with Image.open(io.BytesIO(base64.b64decode(answer["explanation"]))) as picture:
        assert picture.format == "PNG" and picture.size == (280, 280)
        heat = np.asarray(picture.convert("RGB")).astype(int)
    assert (heat[..., 0] - heat[..., 2]).std() > 10  # coloured by a map, not a grey copy of the digit
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["input"]))))[None]
    run = cnnkit.load_run(run_dir)
    offline = explain(run.model, seen[None], run.classes.index(answer["label"]))[0]
    hot = np.unravel_index(offline.argmax(), offline.shape)
    red = heat[..., 0] - heat[..., 2]
    assert red[hot[0] * 10 + 5, hot[1] * 10 + 5] > np.median(red)  # the server's map is hot where cnnkit's is
    for bad in ("maybe", "2"):
        status, refused = post(server, body, kind, f"predict?explain={bad}")
        assert status == 400 and "explain must be 0 or 1" in refused["detail"]


def raw_exchange(server: Server, head: str, chunks: Iterable[bytes] = ()) -> tuple[int, dict]:
    """Send a hand-written request head and body chunks on a raw socket; return (status, JSON body).

    The server may answer and close before the whole body is sent (that is the point of an early 413),
    so errors while sending are ignored and the answer is read anyway.
    """
    host, port = server.url.split("//")[1].rstrip("/").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while piece := sock.recv(65536):
                received += piece
                if b"\r\n\r\n" in received:
                    header, _, body = received.partition(b"\r\n\r\n")
                    length = re.search(rb"(?i)content-length: *(\d+)", header)
                    if length and len(body) >= int(length[1]):
                        break
        except ConnectionResetError:
            pass
    header, _, body = received.partition(b"\r\n\r\n")
    status = int(header.split(b" ", 2)[1])
    return status, json.loads(body[: int(re.search(rb"(?i)content-length: *(\d+)", header)[1])])


# ---------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return mnist_run(tmp_path_factory)


@dataclass
class Offline:
    """What the model says about one image outside the server: load_image, then predict."""

    label: str
    confidence: float
    top: list[str]


@pytest.fixture(scope="module")
def digits(run_dir) -> dict:
    """64 real MNIST test digits as PNG files, with their true labels and the model's offline answers."""
    from cnnkit.prediction import predict
    from cnnkit.preprocess import load_image
    from cnnkit.runs import load_run

    images, labels = mnist_test_digits(64)
    folder = run_dir.parent / "digits"
    folder.mkdir(exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        paths.append(folder / f"{index:03d}.png")
        paths[-1].write_bytes(png_bytes(image))
    run = load_run(run_dir)
    probabilities = predict(run.model, np.stack([load_image(path, run.meta.input, run.meta.preprocessing) for path in paths])).numpy()
    offline = [Offline(run.classes[row.argmax()], float(row.max()), [run.classes[i] for i in np.argsort(-row)[:3]])
               for row in probabilities]
    return {"png": [p.read_bytes() for p in paths], "labels": labels, "offline": offline}


@pytest.fixture(scope="module")
def server(run_dir) -> Iterator[Server]:
    """The MNIST run served with a 1 MiB upload limit."""
    server = start_server(run_dir, max_upload_mb=1)
    yield server
    stop_server(server)


def digits_array(digits, index: int) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(digits["png"][index])))


def good_digit(digits) -> int:
    """The first test digit the model gets right with confidence: a fair 'good PNG'."""
    return next(i for i, p in enumerate(digits["offline"]) if p.label == digits["labels"][i] and p.confidence > 0.9)


# ---------------------------------------------------------------------------------------------------------
# Predictions


def test_multipart_png_of_a_real_digit_is_predicted_correctly(server, digits, run_dir):
    from cnnkit.model_meta import read_model_meta
    from cnnkit.preprocess import load_image

    index = good_digit(digits)
    status, answer = post_image(server, digits["png"][index])
    assert status == 200, answer
    offline = digits["offline"][index]
    assert answer["label"] == digits["labels"][index] == offline.label
    assert answer["confidence"] == pytest.approx(offline.confidence, abs=1e-4)
    assert [label for label, _ in answer["top"]] == offline.top
    assert len(answer["top"]) == 3 and answer["top"][0] == [answer["label"], answer["confidence"]]
    assert all(a[1] >= b[1] for a, b in zip(answer["top"], answer["top"][1:]))
    # "input" is the 28x28 image the model saw: exactly what load_image makes of the upload
    seen = Image.open(io.BytesIO(base64.b64decode(answer["input"])))
    assert seen.format == "PNG" and seen.size == (28, 28) and seen.mode == "L"
    meta = read_model_meta(run_dir)
    np.testing.assert_array_equal(np.asarray(seen), load_image(io.BytesIO(digits["png"][index]), meta.input,
                                                               meta.preprocessing)[0])


def test_json_base64_and_raw_bodies_give_the_same_answer(server, digits):
    index = good_digit(digits)
    data = digits["png"][index]
    _, expected = post_image(server, data)
    encoded = base64.b64encode(data).decode()
    for body, kind in [(json.dumps({"image": encoded}).encode(), "application/json"),
                       (json.dumps({"image": "data:image/png;base64," + encoded}).encode(), "application/json"),
                       (data, "image/png")]:
        status, answer = post(server, body, kind)
        assert status == 200, answer
        assert answer == expected
    assert expected["label"] == digits["labels"][index]


def test_every_answer_matches_the_model_run_offline(server, digits):
    for data, offline in zip(digits["png"][:16], digits["offline"][:16]):
        status, answer = post_image(server, data)
        assert status == 200
        assert answer["label"] == offline.label
        assert answer["confidence"] == pytest.approx(offline.confidence, abs=1e-4)


def test_a_photo_of_ink_on_paper_is_inverted_like_the_training_digits(server, digits):
    """A big black-on-white RGB JPEG (what a phone gives) is converted as `cnnkit predict` converts it."""
    index = good_digit(digits)
    digit = 255 - digits_array(digits, index)
    photo = Image.fromarray(digit).resize((560, 560), Image.Resampling.BILINEAR).convert("RGB")
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=92)
    status, answer = post_image(server, buffer.getvalue(), filename="photo.jpg", content_type="image/jpeg")
    assert status == 200, answer
    assert answer["label"] == digits["labels"][index]
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["input"]))))
    assert seen.shape == (28, 28) and seen[0].mean() < 64  # light digit on a dark background, as MNIST



# ---------------------------------------------------------------------------------------------------------
# Bad input: 4xx with a JSON message, never a 500


def test_a_text_file_is_415(server):
    status, answer = post_image(server, b"just some text, not an image\n" * 20, filename="notes.txt",
                                content_type="text/plain")
    assert status == 415
    assert "not an image" in answer["detail"]


def test_an_unsupported_content_type_is_415(server):
    status, answer = post(server, b"hello", "text/plain")
    assert status == 415 and "multipart/form-data" in answer["detail"]


def test_a_truncated_png_is_400(server, digits):
    data = digits["png"][good_digit(digits)]
    for cut in (len(data) // 2, 20):  # pixel data cut short; header cut short
        status, answer = post_image(server, data[:cut])
        assert status == 400, (cut, answer)
        assert "corrupt or truncated" in answer["detail"]


@pytest.mark.parametrize("body, kind, words", [
    (b"{not json", "application/json", "not valid JSON"),
    (b'{"picture": "abc"}', "application/json", '{"image"'),
    (b'{"image": "***not base64***"}', "application/json", "not valid base64"),
    (b'{"image": ""}', "application/json", "empty"),
    (b'{"image": "", "image": "abc"}', "application/json", 'the body: not valid JSON (the key "image" is given twice'),
    (b'\xff{}', "application/json", "not valid JSON (not UTF-8)"),
])
def test_malformed_json_bodies_are_400(server, body, kind, words):
    status, answer = post(server, body, kind)
    assert status == 400 and words in answer["detail"]


def test_multipart_without_the_file_field_is_400(server, digits):
    status, answer = post_image(server, digits["png"][0], field="image")
    assert status == 400 and "'file'" in answer["detail"]


def test_an_upload_over_the_limit_is_413(server):
    body, kind = multipart(os.urandom(2 * 1024 * 1024), filename="big.png")
    host = server.url.split("//")[1].rstrip("/")
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: {kind}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    status, answer = raw_exchange(server, head, (body[i:i + 65536] for i in range(0, len(body), 65536)))
    assert status == 413
    assert "1 MiB" in answer["detail"]


def test_an_image_over_the_limit_inside_a_body_under_the_body_cap_is_413(server):
    """Multipart of 1.2 MiB: passes the body cap (sized for base64 JSON) but the file itself is over 1 MiB."""
    status, answer = post_image(server, os.urandom(1_200_000 + 100_000), filename="big.png")
    assert status == 413 and "1 MiB" in answer["detail"]


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_sent(server):
    host = server.url.split("//")[1].rstrip("/")
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Content-Length: {50 * 1024 * 1024}\r\nConnection: close\r\n\r\n")
    started = time.monotonic()
    status, answer = raw_exchange(server, head)  # not one byte of the 50 MiB is sent
    assert status == 413 and "1 MiB" in answer["detail"]
    assert time.monotonic() - started < 10


def test_a_chunked_body_without_a_length_is_counted_and_cut_off(server):
    """A client that declares no length (or lies) is stopped at the limit while the body is read."""
    host = server.url.split("//")[1].rstrip("/")
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/png\r\n"
            f"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    block = os.urandom(64 * 1024)
    chunks = [b"%x\r\n" % len(block) + block + b"\r\n"] * 40 + [b"0\r\n\r\n"]  # 2.5 MiB
    status, answer = raw_exchange(server, head, chunks)
    assert status == 413 and "1 MiB" in answer["detail"]
    assert get_json(server, "health")["status"] == "ok"  # and the server is fine


# ---------------------------------------------------------------------------------------------------------
# /health, /model, the page, the docs


def test_health(server):
    health = get_json(server, "health")
    assert health["status"] == "ok" and health["run"] == "mnist"
    assert {"requests", "forward_passes", "largest_batch"} <= set(health)


def test_model_describes_the_run_and_its_test_metrics(server, run_dir):
    model = get_json(server, "model")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert model["run"] == "mnist" and model["dataset"] == "mnist" and model["architecture"] == "seed"
    assert model["classes"] == [str(d) for d in range(10)]
    assert model["input"] == {"channels": 1, "height": 28, "width": 28}
    assert model["preprocessing"]["background"] == "dark"
    assert model["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert model["metrics"]["test_loss"] == metrics["test_loss"]
    assert "test_report" not in model["metrics"]  # the confusion matrix is not needed here
    assert model["max_upload_mb"] == 1


def test_the_page_is_one_self_contained_file(server):
    with urllib.request.urlopen(server.url, timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/html")
        page = response.read().decode()
    for element in ("canvas", "predict", "clear", "upload", "label", "confidence", "bars", "seen"):
        assert f'id="{element}"' in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not load anything from elsewhere"
    assert "@import" not in page and "<script src" not in page and "url(" not in page


def test_openapi_documents_predict(server):
    schema = get_json(server, "openapi.json")
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    with urllib.request.urlopen(server.url + "docs", timeout=30) as response:
        assert response.status == 200


def test_rgb_run_is_served_upload_only(tmp_path_factory):
    server = start_server(rgb_run(tmp_path_factory))
    try:
        model = get_json(server, "model")
        assert model["input"] == {"channels": 3, "height": 32, "width": 32}
        assert model["preprocessing"]["background"] is None and model["metrics"] == {}
        photo = np.random.default_rng(1).integers(0, 256, (3, 50, 70), dtype=np.uint8)
        status, answer = post_image(server, png_bytes(photo))
        assert status == 200, answer
        assert answer["label"] in model["classes"] and len(answer["top"]) == 3
        seen = Image.open(io.BytesIO(base64.b64decode(answer["input"])))
        assert seen.size == (32, 32) and seen.mode == "RGB"
    finally:
        stop_server(server)


# ---------------------------------------------------------------------------------------------------------
# Concurrency and batching


def burst(server: Server, digits, clients: int = 32,
          rounds: int = 3) -> dict[tuple[int, int], tuple[int, tuple[int, dict]]]:
    """`clients` threads posting `rounds` real digits each, all at once: {(client, round): (digit, answer)}."""
    barrier = threading.Barrier(clients)
    answers: dict[tuple[int, int], tuple[int, tuple[int, dict]]] = {}
    errors: list[BaseException] = []

    def client(number: int) -> None:
        try:
            barrier.wait(timeout=60)
            for round_ in range(rounds):
                index = (number * rounds + round_) % len(digits["png"])
                answers[number, round_] = (index, post_image(server, digits["png"][index]))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert len(answers) == clients * rounds
    return answers


def test_concurrent_requests_are_all_answered_correctly_and_batched(server, digits):
    before = get_json(server, "health")
    clients, rounds = 32, 3
    answers = burst(server, digits, clients, rounds)
    for index, (status, answer) in answers.values():
        assert status == 200, answer
        assert answer["label"] == digits["offline"][index].label  # each answer belongs to its own request
        assert answer["confidence"] == pytest.approx(digits["offline"][index].confidence, abs=1e-4)
    after = get_json(server, "health")
    requests = after["requests"] - before["requests"]
    passes = after["forward_passes"] - before["forward_passes"]
    assert requests == clients * rounds
    assert passes < requests, f"{requests} requests took {passes} forward passes: nothing was batched"
    assert after["largest_batch"] > 1


#: Run in the server's process before it starts: the batch size of every forward pass of the served network
#: (the first module called is the network itself, at the server's warm-up pass), one line each in a file.
RECORD_BATCHES = """
import os, torch
_network, _log = [], open(os.environ["BATCHES_LOG"], "a", buffering=1)
def _record(module, inputs):
    if not _network:
        _network.append(module)
    if module is _network[0]:
        _log.write(f"{len(inputs[0])}\\n")
torch.nn.modules.module.register_module_forward_pre_hook(_record)
"""


def test_a_served_run_scores_in_the_batches_it_recorded(run_dir, digits, tmp_path, monkeypatch):
    """Requests batched together are scored in chunks of the run's --eval-batch-size, as evaluate and predict
    score theirs (a large network records a small one: 1,000 EfficientNet-Lite2 inputs at 160 px take 12 GB)."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "eval_batch_size": 4}))
    monkeypatch.setenv("BATCHES_LOG", str(tmp_path / "batches"))
    server = start_server(run, prelude=RECORD_BATCHES)
    try:
        answers = burst(server, digits)
        health = get_json(server, "health")
    finally:
        stop_server(server)
    assert all(status == 200 for _, (status, _) in answers.values())
    sizes = [int(line) for line in (tmp_path / "batches").read_text().split()]
    assert health["largest_batch"] > 4, health  # requests were batched past the recorded size...
    assert sizes[0] == 1 and max(sizes) == 4 and sum(sizes[1:]) == len(answers)  # ...and scored 4 at a time


# ---------------------------------------------------------------------------------------------------------
# Starting


def test_a_port_in_use_is_a_one_line_error():
    from cnnkit.errors import CnnkitError
    from cnnkit.serve.app import bind

    taken = bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        with pytest.raises(CnnkitError, match=rf"127\.0\.0\.1:{port} .*choose another --port"):
            bind("127.0.0.1", port)
    finally:
        taken.close()


def test_a_bad_upload_limit_or_run_is_refused_before_serving(tmp_path, run_dir):
    from cnnkit.errors import CnnkitError
    from cnnkit.serve import create_app

    with pytest.raises(CnnkitError, match="max-upload-mb"):
        create_app(run_dir, max_upload_mb=0)
    with pytest.raises(CnnkitError, match="not a cnnkit run directory"):
        create_app(tmp_path)

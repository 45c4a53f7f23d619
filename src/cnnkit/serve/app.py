"""The HTTP server behind `cnnkit serve RUN`: one page to draw or upload on, a JSON API, batched inference.

    GET  /          a self-contained page (inline CSS and JS, nothing fetched from elsewhere)
    POST /predict   an image as multipart (field `file`), JSON {"image": "<base64>"} or a raw image/* body
    GET  /model     classes, input size, preprocessing and the run's test metrics
    GET  /health    liveness, and how many requests were answered in how many forward passes
    GET  /docs      the OpenAPI documentation FastAPI generates (/openapi.json for the schema)

Every upload is converted by `cnnkit.preprocess.load_image`, exactly as `cnnkit predict` converts a file,
and the response carries the image the model actually saw. Requests that arrive together are stacked
into one forward pass by a small asynchronous micro-batcher; the model runs in a worker thread, so the
event loop keeps accepting and decoding requests meanwhile. User mistakes get 4xx answers with a JSON
`detail` message, never a 500: 413 for an upload over the limit (checked against Content-Length before
anything is read, and counted while reading, so a chunked or lying client is caught too), 415 for a
body that is not an image, 400 for a corrupt or truncated one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import gc
import io
import json
import math
import os
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import python_multipart  # noqa: F401  (Starlette parses multipart bodies with it: fail at import, not per request)
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect
from PIL import Image, UnidentifiedImageError

from cnnkit.data import images as image_policy
from cnnkit.errors import CnnkitError
from cnnkit.fileio import parse_json
from cnnkit.model_meta import ModelMeta
from cnnkit.preprocess import load_image
from cnnkit.records import finite_or_none
from cnnkit.prediction import predict
from cnnkit.runs import load_run
from cnnkit.heatmaps import explain, overlay

__all__ = ["MicroBatcher", "create_app", "serve"]

MIB = 1024 * 1024
#: Image formats an upload may be in: the one image policy's (data.images.ALLOWED_FORMATS), as users name them.
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF")
#: How files in FORMATS begin: an upload starting so but unreadable is a damaged image (400), not another type.
MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
#: Images up to this many pixels (and bytes) are converted on the event loop: well under a millisecond, and
#: two thread switches saved. Larger ones are converted in a worker thread so the loop never stalls.
INLINE_PIXELS = 512 * 512
INLINE_BYTES = 256 * 1024
#: Room for multipart headers and JSON around the image in a request body.
BODY_OVERHEAD = 64 * 1024
TOP_K = 3

_PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "description": "The image: any size or mode, converted as the run's model.json says.",
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["file"],
                           "properties": {"file": {"type": "string", "format": "binary"}}},
            },
            "application/json": {
                "schema": {"type": "object", "required": ["image"],
                           "properties": {"image": {"type": "string", "description":
                                                    "the image file's bytes in base64 (a data: URL is accepted)"}}},
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {"description": "The prediction", "content": {"application/json": {"example": {
            "label": "7", "confidence": 0.98, "top": [["7", 0.98], ["9", 0.01], ["1", 0.004]],
            "input": "<base64 PNG of the image the model saw>",
            "explanation": "<with ?explain=1: base64 PNG of the Grad-CAM heatmap of the label over that image>"}}}},
        "400": {"description": "A corrupt or truncated image, a malformed body, or an explain value not 0 or 1"},
        "413": {"description": "The upload is over the server's --max-upload-mb"},
        "415": {"description": "The body is not an image (or not in a supported format)"},
    },
}


class UploadError(Exception):
    """A user mistake in an upload, answered with `status` and `message` (never a 500)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# ---------------------------------------------------------------------------------------------------------
# Micro-batching


class MicroBatcher:
    """Stack images submitted at about the same time into one call of `forward`, run in a worker thread.

    The first waiting image starts a batch. More join it while any are already queued, and, for at most
    `max_wait` seconds, while other requests are still being read or decoded (`arriving`) and will be
    submitted in a moment; a lone request is therefore never delayed. While one batch runs, the next
    accumulates. `forward` maps uint8 (N, C, H, W) to one row of results per image.
    """

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], *, max_batch: int = 64,
                 max_wait: float = 0.004, max_queue: int = 4096) -> None:
        if max_batch < 1 or max_wait < 0:
            raise ValueError("max_batch must be >= 1 and max_wait >= 0")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.requests = 0  # images answered by forward passes
        self.passes = 0  # forward passes run
        self.largest = 0  # the largest batch so far
        self.busy_seconds = 0.0  # time spent inside forward
        self._arriving = 0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request that will submit an image soon, so a forming batch waits a moment for it."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1

    def submit(self, image: np.ndarray) -> asyncio.Future:
        """Queue one uint8 (C, H, W) image; the future resolves to its row of `forward`'s output."""
        if self._task is None or self._task.done():
            self._start()
        if self._queue.qsize() >= self.max_queue:
            raise UploadError(503, "the server is overloaded; try again in a moment")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((image, future))
        return future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "forward_passes": self.passes, "largest_batch": self.largest,
                "mean_batch": round(self.requests / self.passes, 2) if self.passes else None,
                "queued": self._queue.qsize() if self._queue is not None else 0,
                "forward_seconds": round(self.busy_seconds, 3)}

    def _start(self) -> None:
        self._queue = asyncio.Queue()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnkit-forward")
        self._task = asyncio.get_running_loop().create_task(self._run(self._queue), name="cnnkit-batcher")

    async def _run(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if self._arriving <= 0 or remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [(image, future) for image, future in batch if not future.done()]  # clients gone
            if not batch:
                continue
            images = np.stack([image for image, _ in batch])
            started = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self._executor, self.forward, images)
            except Exception as error:  # noqa: BLE001 - handed to every waiting request
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.busy_seconds += time.perf_counter() - started
            self.passes += 1
            self.requests += len(batch)
            self.largest = max(self.largest, len(batch))
            for (_, future), row in zip(batch, rows):
                if not future.done():
                    future.set_result(row)


# ---------------------------------------------------------------------------------------------------------
# Upload limit, enforced below the framework so nothing reads past it


def _send_json(send, status: int, detail: str):
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]

    async def sending() -> None:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return sending()


class UploadLimit:
    """ASGI middleware: refuse a request body over `max_bytes`, by its Content-Length and by counting.

    A declared length over the limit is answered 413 before any of the body is read (a client that sent
    `Expect: 100-continue` never sends it). A body without a length (chunked), or longer than it said,
    is counted as it is received and cut off with 413 as soon as it passes the limit.
    """

    def __init__(self, app, max_bytes: int, too_large: str) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.too_large = too_large

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await _send_json(send, 400, "the Content-Length header is not a number")
                return
            if length > self.max_bytes:
                await _send_json(send, 413, self.too_large)
                return
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise HTTPException(413, self.too_large)  # raised inside the endpoint: answered 413
            return message

        await self.app(scope, counting_receive, send)


# ---------------------------------------------------------------------------------------------------------
# Reading and converting an upload


async def read_upload(request: Request, max_bytes: int) -> bytes:
    """The uploaded file's bytes, from a multipart, JSON (base64) or raw image body."""
    media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=16)
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise UploadError(400, "a multipart upload needs the image file in the field 'file'")
            data = await upload.read(max_bytes + 1)
        finally:
            await form.close()
    elif media == "application/json" or media.endswith("+json"):
        try:
            payload = parse_json((await request.body()).decode("utf-8"), "the body")
        except UnicodeDecodeError:
            raise UploadError(400, "the body is not valid JSON (not UTF-8)") from None
        except ValueError as error:  # UnreadableFile is a ValueError: too deep, too long a number, a key twice
            raise UploadError(400, str(error)) from None
        text = payload.get("image") if isinstance(payload, dict) else None
        if not isinstance(text, str):
            raise UploadError(400, 'a JSON body must be {"image": "<the image file in base64>"}')
        if text.startswith("data:"):
            text = text.partition(",")[2]
        try:
            data = base64.b64decode("".join(text.split()), validate=True)
        except (binascii.Error, ValueError):
            raise UploadError(400, "'image' is not valid base64") from None
    elif media.startswith("image/") or media == "application/octet-stream":
        data = await request.body()
    else:
        shown = media or "no Content-Type"
        raise UploadError(415, f"send the image as multipart/form-data (field 'file'), as JSON "
                               f'{{"image": "<base64>"}}, or as a raw image/* body; got {shown}')
    if len(data) > max_bytes:
        raise UploadError(413, f"the image is over this server's limit of {max_bytes / MIB:g} MiB")
    if not data:
        raise UploadError(400, "the upload is empty")
    return data


def open_image(data: bytes) -> Image.Image:
    """Identify an upload from its header under the one image policy (data.images.open_image: in-process formats
    only, the pixel cap): 415 if it is not an image, 413 if it is too many pixels."""
    try:
        image = image_policy.open_image(io.BytesIO(data))
    except image_policy.ImageRefused as error:
        reason = str(error).split("; shrink it", 1)[0]  # the rest names a flag of the server, not of the client
        raise UploadError(413, f"the image is too large: {reason}; send a smaller one") from None
    except UnidentifiedImageError:
        if data.startswith(MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
            raise UploadError(400, "the image is corrupt or truncated (its header cannot be read)") from None
        raise UploadError(415, "the upload is not an image in a supported format "
                               f"({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as error:
        raise UploadError(413, f"the image has too many pixels ({error})") from None
    except image_policy.DECODE_ERRORS as error:
        raise UploadError(400, f"the image is corrupt or truncated ({type(error).__name__}: {error})") from None
    return image


def explain_wanted(request: Request) -> bool:
    """?explain=1 (or true/yes) asks for a heatmap; 0/false/no or nothing for none; anything else is a 400."""
    value = request.query_params.get("explain", "0").strip().lower()
    if value not in ("0", "1", "true", "false", "yes", "no", ""):
        raise UploadError(400, f"explain must be 0 or 1, got {value[:20]!r}")
    return value in ("1", "true", "yes")


class Explainer:
    """Grad-CAM heatmaps for the server, one at a time on a thread of their own, on a copy of the model: Grad-CAM
    hooks the layer it reads while it works, and the batcher's forward passes on the served model must not run
    through those hooks; nor may heatmaps waiting their turn hold the threads that decode uploads."""

    #: Heatmap requests that may wait at once; beyond them a 503 says to come back (a backward pass each).
    MAX_WAITING = 16

    def __init__(self, model: Any) -> None:
        self.model = model  # the served ImageClassifier
        self.copy: Any = None  # made at the first request for a heatmap
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnkit-explain")
        self.waiting = 0  # counted on the event loop's thread only

    async def explain(self, image: np.ndarray, target: int) -> str:
        """picture() on the explainer's thread, or a 503 when MAX_WAITING requests are already waiting."""
        if self.waiting >= self.MAX_WAITING:
            raise UploadError(503, "the server is busy explaining other images; try again shortly")
        self.waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, self.picture, image, target)
        finally:
            self.waiting -= 1

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

    def picture(self, image: np.ndarray, target: int) -> str:
        """The heatmap of class `target` over `image` (uint8 C, H, W), as a base64 PNG the size of the page's view."""
        import torch


        if self.copy is None:
            self.copy = copy.deepcopy(self.model).to(memory_format=torch.contiguous_format)
        try:
            heat = explain(self.copy, image[None], target)[0]
        except CnnkitError as error:  # a model without a spatial layer
            raise UploadError(501, f"this server cannot explain: {error}") from None
        return picture_base64(overlay(image, heat, None, side=280))


class PixelBudget:
    """The pixels that may be decoding at once: a large image waits for room instead of adding its memory to
    the others' (30 concurrent 64-MP uploads each decoded at once peaked at 3 GB). An image larger than the
    whole budget waits until it has the budget to itself."""

    def __init__(self, pixels: int) -> None:
        self.total = self.free = pixels
        self.condition = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int):
        pixels = min(pixels, self.total)
        async with self.condition:
            await self.condition.wait_for(lambda: self.free >= pixels)
            self.free -= pixels
        try:
            yield
        finally:
            async with self.condition:
                self.free += pixels
                self.condition.notify_all()


def convert(image: Image.Image, meta: ModelMeta) -> tuple[np.ndarray, str]:
    """(uint8 (C, H, W) exactly as the model takes it, that image as a base64 PNG); closes `image`."""
    with image:
        try:
            array = load_image(image, meta.input, meta.preprocessing)
        except CnnkitError as error:
            reason = str(error).split("not a readable image", 1)[-1].strip(" ()")
            raise UploadError(400, f"the image is corrupt or truncated ({reason})") from None
    return array, png_base64(array)


def png_base64(array: np.ndarray) -> str:
    """uint8 (C, H, W) as a base64 PNG, as the JSON answers carry images."""
    return picture_base64(image_policy.to_image(array))


def picture_base64(picture: Image.Image) -> str:
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ---------------------------------------------------------------------------------------------------------
# The application


def model_info(run, max_upload_mb: float) -> dict[str, Any]:
    """GET /model: what the page and API clients need to know about the served run."""
    meta = run.meta
    recorded = run.metrics.model_dump(exclude_none=True)
    metrics = {key: value for key, value in recorded.items() if key.startswith("test_") and key != "test_report"}
    if run.metrics.test_report and run.metrics.test_report.macro_f1 is not None:
        metrics["test_macro_f1"] = run.metrics.test_report.macro_f1
    for key in ("num_test", "epochs", "val_accuracy"):
        if key in recorded:
            metrics[key] = recorded[key]
    return {
        "run": run.path.name,
        "architecture": meta.architecture,
        "dataset": meta.dataset,
        "classes": list(meta.classes),
        "input": {"channels": meta.input.channels, "height": meta.input.height, "width": meta.input.width},
        "preprocessing": meta.document.get("preprocessing", {}),
        "metrics": finite_or_none(metrics),  # NaN is not JSON: the page's parser would fail on it
        "max_upload_mb": max_upload_mb,
    }


def create_app(run_dir: str | Path, max_upload_mb: float = 10, *, max_batch: int = 64,
               max_wait_ms: float = 4.0, trust_code: bool = False) -> FastAPI:
    """The FastAPI application serving the run in `run_dir` (loaded now: a bad run fails here, not later).

    Uploads over `max_upload_mb` MiB are refused with 413. Up to `max_batch` requests arriving within
    `max_wait_ms` of each other share one forward pass.
    """
    import torch


    if not (isinstance(max_upload_mb, (int, float)) and math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise CnnkitError(f"--max-upload-mb must be a positive number, got {max_upload_mb!r}")
    run = load_run(run_dir, trust_code=trust_code)
    # NHWC weights: 2.5x faster forward passes for the seed model at batch 32 on the CPU (8.6 vs 21.7 ms),
    # the same answers (within 1e-6), as training already runs.
    run.model.to(memory_format=torch.channels_last)
    meta, classes = run.meta, run.classes
    max_bytes = int(max_upload_mb * MIB)
    info = model_info(run, max_upload_mb)
    top_k = min(TOP_K, len(classes))

    def forward(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return predict(run.model, images, run.eval_batch_size).numpy()

    forward(np.zeros((1, *run.input_shape), dtype=np.uint8))  # warm up, and fail now if the model cannot run
    explainer = Explainer(run.model)
    batcher = MicroBatcher(forward, max_batch=max_batch, max_wait=max_wait_ms / 1000)
    pixel_budget = PixelBudget(image_policy.max_pixels())
    decoder = ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2)), thread_name_prefix="cnnkit-decode")
    page = resources.files("cnnkit.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    started = time.time()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await batcher.close()
        decoder.shutdown(wait=False, cancel_futures=True)
        explainer.close()

    name = run.path.name
    app = FastAPI(
        title=f"cnnkit serve: {name}",
        version=str(meta.document.get("cnnkit_version", "")) or "0",
        description=f"{meta.architecture} trained on {meta.dataset}, classes "
                    f"{', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}. Draw or upload on `/`.",
        lifespan=lifespan,
    )
    too_large = f"the upload is over this server's limit of {max_upload_mb:g} MiB"
    app.add_middleware(UploadLimit, max_bytes=math.ceil(max_bytes * 4 / 3) + BODY_OVERHEAD, too_large=too_large)
    app.state.run = run
    app.state.batcher = batcher

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, error: UploadError) -> JSONResponse:
        return JSONResponse({"detail": error.message}, status_code=error.status)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, error: ClientDisconnect) -> Response:
        # The client left mid-upload: nobody reads an answer, and it is no server error to log.
        return Response(status_code=400)

    # HEAD wherever GET works (monitors and `curl -I` use it; FastAPI's GET routes answer it 405).
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.api_route("/health", methods=["GET", "HEAD"], summary="Liveness and batching counters")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "run": name, "uptime_seconds": round(time.time() - started, 1),
                             **batcher.stats()})

    @app.api_route("/model", methods=["GET", "HEAD"],
                   summary="The served model: classes, input size, preprocessing, test metrics")
    async def model() -> JSONResponse:
        return JSONResponse(info)

    @app.post("/predict", summary="Classify one image (?explain=1: with a heatmap of why)",
              openapi_extra=_PREDICT_OPENAPI)
    async def predict_image(request: Request) -> JSONResponse:
        loop = asyncio.get_running_loop()
        why = explain_wanted(request)
        with batcher.arriving():
            data = await read_upload(request, max_bytes)
            image = open_image(data)
            if image.width * image.height <= INLINE_PIXELS and len(data) <= INLINE_BYTES:
                array, seen = convert(image, meta)
            else:
                async with pixel_budget.hold(image.width * image.height):
                    array, seen = await loop.run_in_executor(decoder, convert, image, meta)
            answer = batcher.submit(array)
        probabilities = await answer
        order = np.argsort(-probabilities, kind="stable")[:top_k]
        top = [[classes[i], round(float(probabilities[i]), 6)] for i in order]
        answer = {"label": top[0][0], "confidence": top[0][1], "top": top, "input": seen}
        if why:
            answer["explanation"] = await explainer.explain(array, int(order[0]))
        return JSONResponse(answer)

    return app


# ---------------------------------------------------------------------------------------------------------
# Running it


#: A client the server waits on (for a new connection's request, a request's head or the rest of its body) that sends
#: nothing for this long is disconnected (`--stall-timeout`): uvicorn's h11 protocol times out only idle keep-alive
#: connections, so a connection that sent half its headers or half its body stayed open (still there after 45 s).
STALL_TIMEOUT_S = 10.0
#: At most this many connections at once (uvicorn answers more with 503), and request heads of at most this
#: size (h11's own bound on an incomplete event: a larger head is answered 400).
MAX_CONNECTIONS = 1000
MAX_HEAD_BYTES = 64 * 1024


def stall_timeout_protocol(stall_timeout_s: float = STALL_TIMEOUT_S):
    """uvicorn's h11 protocol with a timer on the client: re-armed by every byte received, it closes a
    connection whose client stalls `stall_timeout_s` while the server waits on it (the app's own work is never
    cut short)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class StallTimeoutProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._stall_timer = None
            self._arm_stall_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._arm_stall_timer()

        def connection_lost(self, exc) -> None:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
            super().connection_lost(exc)

        def _arm_stall_timer(self) -> None:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
            self._stall_timer = self.loop.call_later(stall_timeout_s, self._stalled)

        def _stalled(self) -> None:
            self._stall_timer = None
            answering = (self.cycle is not None and not self.cycle.response_complete
                         and self.conn.their_state is not h11.SEND_BODY)
            if answering:  # the whole request is in and the app is on it: not the client's stall
                self._arm_stall_timer()
            elif not self.transport.is_closing():
                self.transport.close()

    return StallTimeoutProtocol


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0 picks a free one), or a CnnkitError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as error:
        raise CnnkitError(f"--host {host!r}: cannot resolve ({error.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        hint = "; choose another --port" if error.errno in (98, 48) else ""  # EADDRINUSE (Linux, macOS)
        raise CnnkitError(f"cannot listen on {host}:{port} ({error.strerror}){hint}") from None
    sock.setblocking(False)
    return sock


def serve(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 10, *,
          threads: int | None = None, access_log: bool = False, trust_code: bool = False,
          stall_timeout_s: float = STALL_TIMEOUT_S) -> None:
    """Serve the run until interrupted (Ctrl+C). Binds 127.0.0.1 unless another `host` is given.

    `threads` sets torch's intra-op threads (default: half the cores, leaving the rest to the event loop
    and image decoding). `stall_timeout_s`: how long a client may send nothing while the server waits on it
    (longer for clients on slow links). Prints the address once listening.
    """
    import torch
    import uvicorn

    if not 0 < stall_timeout_s < float("inf"):
        raise CnnkitError(f"stall timeout must be a positive number of seconds, got {stall_timeout_s}")
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) // 2))
    app = create_app(run_dir, max_upload_mb, trust_code=trust_code)
    # torch and the app leave ~200k long-lived objects that every full garbage collection would walk again
    # (a 100-300 ms pause in the middle of some request); freezing them makes those collections ~free.
    gc.collect()
    gc.freeze()
    sock = bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    url = f"http://{shown}:{bound_port}/"
    run = app.state.run
    print(f"serving {run.path.name} ({run.meta.architecture} on {run.meta.dataset}) at {url} "
          f"(API docs: {url}docs); Ctrl+C to stop", flush=True)
    if bound_host not in ("127.0.0.1", "::1"):
        print(f"note: listening on {bound_host}, reachable from other machines; the server has no authentication",
              flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, timeout_graceful_shutdown=5,
                            http=stall_timeout_protocol(stall_timeout_s), limit_concurrency=MAX_CONNECTIONS,
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl+C: that is the normal exit
        pass
    finally:
        sock.close()
    print("stopped", flush=True)

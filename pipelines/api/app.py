"""The inference API's routes: FastAPI serving the exported ONNX model with ONNX Runtime (no TensorFlow).

Images arrive as multipart files of any size or mode and are decoded as `predict` decodes them
(pipelines/predict.py), or as arrays of pixels already decoded; a bad request is a 4xx with a
one-line reason and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST

from pipelines.api.batching import Batcher
from pipelines.api.follow import StageFollower
from pipelines.api.guards import BodyGuard
from pipelines.api.monitor import DriftMonitor, Metrics, RequestMetrics
from pipelines.api.settings import Batching, Drift, Limits, Settings, mib
from pipelines.predict import DEFAULT_TOP_K, PredictError, decode_pixels, rank
from stages.common.errors import DataError
from stages.common.schemas import IMAGE_SHAPE
from stages.common.serving import OnnxClassifier

log = logging.getLogger("uvicorn.error")

PAGE = Path(__file__).with_name("page.html")
NPY_TYPE = "application/x-npy"
RAW_TYPE = "application/octet-stream"
SHAPE_HEADER = "X-Shape"
TOP_K_HELP = f"How many classes to return per image (default {DEFAULT_TOP_K})."
# Requests this small are read, and decoded when their images hold this few pixels, on the event
# loop itself: handing them to a thread costs more than decoding a few thumbnails.
INLINE_BYTES = 256 * 1024
INLINE_PIXELS = 16 * 32 * 32


def read_upload(upload: UploadFile, limits: Limits) -> tuple[str, bytes]:
    """One uploaded file's name and bytes, or an HTTPException naming the file and what is wrong."""
    name = upload.filename or "upload"
    data = upload.file.read(limits.max_file_bytes + 1)
    if not data:
        raise HTTPException(400, f"{name} is empty; send an image file")
    if len(data) > limits.max_file_bytes:
        raise HTTPException(413, f"{name} is larger than {mib(limits.max_file_bytes)}; send a smaller image")
    return name, data


def pixel_count(data: bytes) -> int:
    """Width times height from the image's header, without decoding it (0 when it is unreadable:
    decoding then names the problem)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.width * img.height
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return 0


def read_uploads(uploads: list[UploadFile], limits: Limits) -> tuple[list[tuple[str, bytes]], int]:
    """The request's files as (name, bytes) and the pixels they hold by their headers; refused (413)
    when those pass `limits.max_pixels`, before any image is decoded, so one request costs bounded
    time and memory."""
    files = [read_upload(upload, limits) for upload in uploads]
    total = 0
    for name, data in files:
        total += pixel_count(data)
        if total > limits.max_pixels:
            raise HTTPException(413, f"the images up to {name} hold {total:,} pixels, more than the "
                                     f"{limits.max_pixels:,} one request may; send fewer or smaller images "
                                     "(the model sees 32x32)")
    return files, total


def decode_files(files: list[tuple[str, bytes]]) -> np.ndarray:
    try:
        return np.stack([decode_pixels(io.BytesIO(data), name) for name, data in files])
    except PredictError as err:
        raise HTTPException(415, str(err)) from None


def decode_uploads(uploads: list[UploadFile], limits: Limits) -> np.ndarray:
    """The request's images as model pixels (see read_uploads for what is refused)."""
    return decode_files(read_uploads(uploads, limits)[0])


def pixels_from_body(body: bytes, content_type: str, shape_header: str | None) -> np.ndarray:
    """An array of already-decoded images, (N, 32, 32, 3) uint8 RGB: a .npy file, or raw bytes in
    C order with their shape in the X-Shape header ("N,32,32,3")."""
    expected = f"(N, {', '.join(map(str, IMAGE_SHAPE))}) uint8"
    if content_type == NPY_TYPE:
        array = npy_array(body)
    elif content_type == RAW_TYPE:
        try:
            shape = tuple(int(n) for n in (shape_header or "").split(","))
            array = np.frombuffer(body, dtype=np.uint8).reshape(shape)
        except ValueError:
            raise HTTPException(422, f"{SHAPE_HEADER} '{shape_header}' does not describe the {len(body)} bytes "
                                     f"sent; send {SHAPE_HEADER}: N,32,32,3 with N*3072 bytes") from None
    else:
        raise HTTPException(415, f"Content-Type '{content_type}' is not taken here; send {NPY_TYPE} or "
                                 f"{RAW_TYPE} with {SHAPE_HEADER}")
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[1:] != IMAGE_SHAPE or not len(array):
        raise HTTPException(422, f"pixels of shape {array.shape} and dtype {array.dtype}; send {expected} "
                                 "(resize and convert first, or send image files to /predict)")
    return array


def npy_array(body: bytes) -> np.ndarray:
    """A .npy file's array, its header checked against the bytes that follow before anything is
    allocated: np.load would first allocate whatever shape the header claims."""
    from numpy.lib import format as npy

    stream = io.BytesIO(body)
    try:
        version = npy.read_magic(stream)
        header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran_order, dtype = header(stream)
        if dtype.hasobject:
            raise ValueError("it holds Python objects")
        data = body[stream.tell():]
        if len(data) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"its header describes {shape} {dtype} but {len(data)} bytes follow")
        return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran_order else "C")
    except ValueError as err:
        raise HTTPException(415, f"the body is not a readable .npy array ({err}); send np.save's bytes") from None


def served_test_accuracy(signature: dict[str, Any]) -> float | None:
    """The test accuracy of the model as served (one view per image); exports made before the
    export stage measured it have only the evaluation's, which may average several views."""
    served = (signature.get("served") or {}).get("accuracy")
    scores = signature.get("metrics") or {}
    return served if served is not None else scores.get("accuracy") if scores.get("split") == "test" else None


# Where FastAPIOffline serves the Swagger UI, Redoc and favicon files it ships.
DOCS_ASSETS_URL = "/static-offline-docs"
REDOC_SCRIPT_URL = "/redoc-offline.js"


@functools.cache
def offline_redoc_script() -> str:
    """Redoc as fastapi-offline ships it, less the one thing it still fetches from outside: its
    maker's logo in the sidebar (the API's favicon stands in)."""
    import fastapi_offline

    script = Path(fastapi_offline.__file__).parent / "static" / "redoc.standalone.js"
    return script.read_text().replace("https://cdn.redoc.ly/redoc/logo-mini.svg", f"{DOCS_ASSETS_URL}/favicon.png")


class Model:
    """The model as requests reach it: batched with other requests' images, or alone (max_batch 1).
    Each model call also adds its images to the drift window and counts its answers by class, on
    the model's thread: the event loop only parses, decodes small uploads and answers."""

    def __init__(self, model: OnnxClassifier, signature: dict[str, Any], batching: Batching, drift: Drift) -> None:
        self.drift = DriftMonitor(None, drift)
        self.metrics = Metrics(model.classes, self.drift)
        self.swap(model, signature)
        self.batcher = Batcher(self.infer, batching, self.metrics.observe_batch) if batching.max_batch > 1 else None
        self.decoder = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="decode")

    def swap(self, model: OnnxClassifier, signature: dict[str, Any]) -> None:
        """Serve another model from the next model call on; the drift window starts anew against its
        export's statistics. One of other classes is refused: clients read classes from /metadata."""
        if hasattr(self, "model") and model.classes != self.model.classes:
            raise DataError(f"version {signature.get('version')} has other classes ({', '.join(model.classes)}) "
                            "than the one served; start a new server for it")
        self.model, self.signature = model, signature
        self.drift.compare_with((signature.get("input") or {}).get("statistics"))
        self.metrics.show_model(signature, served_test_accuracy(signature))

    def infer(self, pixels: np.ndarray) -> np.ndarray:
        probabilities = self.model.probabilities(pixels)
        self.drift.add(pixels)
        self.metrics.observe_answers(probabilities, self.model.classes)
        return probabilities

    async def pixels(self, decode: Callable[[], np.ndarray]) -> np.ndarray:
        """Decoded off the event loop (a pool of one thread per core bounds the memory concurrent
        decodes take), so /health and others are answered meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.decoder, decode)

    async def uploaded_pixels(self, files: list[UploadFile], limits: Limits) -> np.ndarray:
        if sum(upload.size or 0 for upload in files) <= INLINE_BYTES:
            named, pixels = read_uploads(files, limits)
            if pixels <= INLINE_PIXELS:
                return decode_files(named)
            return await self.pixels(functools.partial(decode_files, named))
        return await self.pixels(functools.partial(decode_uploads, files, limits))

    async def answer(self, pixels: Awaitable[np.ndarray], top_k: int) -> list[list[tuple[str, float]]]:
        """The top-k classes of each image; the model runs off the event loop too."""
        if self.batcher is None:
            images = await pixels
            self.metrics.observe_batch(len(images))
            probabilities = await asyncio.to_thread(self.infer, images)
        else:
            async with self.batcher.decoding():
                images = await pixels
            probabilities = await self.batcher.submit(images)
        return rank(probabilities, self.model.classes, top_k)


async def follow_stage(served: Model, follower: StageFollower, every_s: float) -> None:
    """Poll the registry stage off the event loop; swap in the version it moves to."""
    while True:
        await asyncio.sleep(every_s)
        moved = await asyncio.to_thread(follower.poll)
        if moved is not None:
            try:
                served.swap(*moved)
            except DataError as err:
                log.warning("%s", err)


def create_app(model: OnnxClassifier, signature: dict[str, Any], settings: Settings,
               follower: StageFollower | None = None) -> FastAPI:
    """The app for `model`; `signature` is the export's signature.json. With `follower`, the app
    follows a registry stage (settings.follow)."""
    limits = settings.limits
    served = Model(model, {**signature, "git_rev": settings.git_rev}, settings.batching, settings.drift)
    drift, metrics = served.drift, served.metrics

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if served.batcher is not None:
            served.batcher.start()  # on the loop that serves the requests
        polling = None
        if follower is not None and settings.follow is not None:
            polling = asyncio.create_task(follow_stage(served, follower, settings.follow.poll_s))
        yield
        if polling is not None:
            polling.cancel()
        if served.batcher is not None:
            await served.batcher.stop()

    # /docs and /redoc with their scripts served from here: the CDN FastAPI loads them from is
    # out of reach offline, and the pages then draw blank.
    app = FastAPIOffline(title="cifar10-pipeline inference API", version=served.signature.get("version", "unknown"),
                         lifespan=lifespan,
                         description="Class probabilities for images, from the pipeline's exported ONNX model.",
                         static_url=DOCS_ASSETS_URL, redoc_url=None)
    app.add_middleware(BodyGuard, limits=limits)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outside the guard: its refusals count too

    @app.get("/", include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} - ReDoc",
                              redoc_js_url=REDOC_SCRIPT_URL, redoc_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
                              with_google_fonts=False)

    @app.get(REDOC_SCRIPT_URL, include_in_schema=False)
    def redoc_script() -> Response:
        return Response(offline_redoc_script(), media_type="text/javascript")

    @app.exception_handler(RequestValidationError)
    async def one_line_validation_error(_request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
        return JSONResponse(status_code=422, content={"detail": f"{where}: {first.get('msg', 'invalid')}"})

    @app.get("/health")
    def health() -> dict[str, Any]:
        """"ok", or "degraded" with the reason when the inputs drift from the test split's colours."""
        return {**drift.state(), "version": served.signature.get("version", "unknown")}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        signature = served.signature
        return {
            "classes": served.model.classes,
            "version": signature.get("version"),
            "git_rev": signature.get("git_rev"),  # the commit holding this export, None if uncommitted
            "code_rev": signature.get("code_rev"),
            "model_md5": signature.get("model_md5"),
            "test_accuracy": served_test_accuracy(signature),
            "metrics": signature.get("metrics") or {},
            "input": signature.get("input"),
            "onnx_opset": signature.get("onnx_opset"),
            "registry": signature.get("registry"),  # the stage followed and its version (--stage), else None
        }

    def answers(names: list[str | None], ranked: list[list[tuple[str, float]]]) -> JSONResponse:
        # Plain JSON types already: a JSONResponse skips FastAPI's encoding pass over them.
        return JSONResponse({"version": served.signature.get("version"), "predictions": [
            {"file": name, "class": best[0][0], "probability": round(best[0][1], 6),
             "top_k": [{"class": label, "probability": round(p, 6)} for label, p in best]}
            for name, best in zip(names, ranked)]})

    @app.post("/predict")
    async def predict(
        files: Annotated[list[UploadFile], File(description="One or more images, any size or mode.")],
        top_k: Annotated[int | None, Query(ge=1, description=TOP_K_HELP)] = None,
        top_k_field: Annotated[int | None, Form(alias="top_k", ge=1,
                                                description="The same, as a multipart field.")] = None,
    ) -> JSONResponse:
        if len(files) > limits.max_files:
            raise HTTPException(413, f"{len(files)} files in one request; send at most {limits.max_files}")
        ranked = await served.answer(served.uploaded_pixels(files, limits), top_k or top_k_field or DEFAULT_TOP_K)
        return answers([upload.filename for upload in files], ranked)

    @app.post("/predict/pixels", openapi_extra={"requestBody": {"required": True, "content": {
        NPY_TYPE: {"schema": {"type": "string", "format": "binary"}},
        RAW_TYPE: {"schema": {"type": "string", "format": "binary"}}}}})
    async def predict_pixels(
        request: Request,
        top_k: Annotated[int | None, Query(ge=1, description=TOP_K_HELP)] = None,
    ) -> JSONResponse:
        """Images already decoded, as (N, 32, 32, 3) uint8 RGB: a .npy body (`application/x-npy`),
        or raw bytes in C order (`application/octet-stream`) with an `X-Shape: N,32,32,3` header.
        Each answer's `file` is the image's index."""
        body = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        shape = request.headers.get(SHAPE_HEADER)
        decode = functools.partial(pixels_from_body, body, content_type, shape)
        ranked = await served.answer(served.pixels(lambda: decode().astype(np.float32)), top_k or DEFAULT_TOP_K)
        return answers([str(i) for i in range(len(ranked))], ranked)

    return app

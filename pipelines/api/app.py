"""The inference API: FastAPI serving the exported ONNX model with ONNX Runtime (no TensorFlow).

`cifar10-pipeline api` starts it with uvicorn. Images arrive as multipart files of any size or mode
and are decoded as `predict` decodes them (pipelines/predict.py); a bad file is a 4xx with a
one-line reason and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi_offline import FastAPIOffline
from PIL import Image

from pipelines.api_guards import BodyGuard, Limits, head_deadline_protocol, mib
from pipelines.predict import DEFAULT_TOP_K, PredictError, decode_pixels
from stages.common.serving import OnnxClassifier, load_exported

DEFAULT_LIMITS = Limits()


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


def decode_uploads(uploads: list[UploadFile], limits: Limits) -> np.ndarray:
    """The request's images as model pixels; refused (413) before any is decoded when together they
    hold more than `limits.max_pixels`, so one request costs bounded time and memory."""
    files = [read_upload(upload, limits) for upload in uploads]
    total = 0
    for name, data in files:
        total += pixel_count(data)
        if total > limits.max_pixels:
            raise HTTPException(413, f"the images up to {name} hold {total:,} pixels, more than the "
                                     f"{limits.max_pixels:,} one request may; send fewer or smaller images "
                                     "(the model sees 32x32)")
    try:
        return np.stack([decode_pixels(io.BytesIO(data), name) for name, data in files])
    except PredictError as err:
        raise HTTPException(415, str(err)) from None


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


def create_app(model: OnnxClassifier, signature: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> FastAPI:
    # /docs and /redoc with their scripts served from here: the CDN FastAPI loads them from is
    # out of reach offline, and the pages then draw blank.
    app = FastAPIOffline(title="cifar10-pipeline inference API", version=signature.get("version", "unknown"),
                         description="Class probabilities for images, from the pipeline's exported ONNX model.",
                         static_url=DOCS_ASSETS_URL, redoc_url=None)
    app.add_middleware(BodyGuard, limits=limits)
    decoder = ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="decode")

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
    def health() -> dict[str, str]:
        return {"status": "ok", "version": signature.get("version", "unknown")}

    @app.get("/metadata")
    def metadata() -> dict[str, Any]:
        metrics = signature.get("metrics") or {}
        return {
            "classes": model.classes,
            "version": signature.get("version"),
            "git_rev": signature.get("git_rev"),  # the commit holding this export, None if uncommitted
            "code_rev": signature.get("code_rev"),
            "model_md5": signature.get("model_md5"),
            "test_accuracy": metrics.get("accuracy") if metrics.get("split") == "test" else None,
            "metrics": metrics,
            "input": signature.get("input"),
            "onnx_opset": signature.get("onnx_opset"),
        }

    @app.post("/predict")
    async def predict(
        files: Annotated[list[UploadFile], File(description="One or more images, any size or mode.")],
        top_k: Annotated[int | None, Query(ge=1, description="How many classes to return per image "
                                                            f"(default {DEFAULT_TOP_K}).")] = None,
        top_k_field: Annotated[int | None, Form(alias="top_k", ge=1,
                                                description="The same, as a multipart field.")] = None,
    ) -> dict[str, Any]:
        top_k = top_k or top_k_field or DEFAULT_TOP_K
        if len(files) > limits.max_files:
            raise HTTPException(413, f"{len(files)} files in one request; send at most {limits.max_files}")
        # Decoding and ONNX Runtime (both release the GIL) run off the event loop, so /health and
        # other requests are answered meanwhile; decoding in a pool of its own bounds the memory
        # that concurrent requests' decodes take together.
        loop = asyncio.get_running_loop()
        pixels = await loop.run_in_executor(decoder, decode_uploads, files, limits)
        ranked = await asyncio.to_thread(model.top_k, pixels, min(top_k, len(model.classes)))
        return {"version": signature.get("version"), "predictions": [
            {"file": upload.filename, "class": best[0][0], "probability": round(best[0][1], 6),
             "top_k": [{"class": name, "probability": round(p, 6)} for name, p in best]}
            for upload, best in zip(files, ranked)]}

    return app


def exports_at(repo: Path, rev: str, exports: Path, dest: Path) -> Path:
    """The export folder as it was at a git revision (a commit, a branch, a GTO tag such as
    cifar10-classifier@v0.0.1), from DVC's cache or remote."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    from stages.common.errors import ConfigError, DataError

    try:
        fs = DVCFileSystem(str(repo), rev=rev)
    except (SCMError, DvcException) as err:
        raise ConfigError(f"revision '{rev}' not found in {repo} ({err}); pass a commit, branch or tag") from None
    try:
        fs.get(exports.as_posix(), str(dest), recursive=True)
    except (FileNotFoundError, DvcException) as err:
        raise DataError(f"{exports} at '{rev}' cannot be read ({err}); that revision has no export, "
                        "or its files are in no cache: `dvc pull` first") from None
    return dest


def serve(exports: Path, host: str, port: int, threads: int = 0, git_rev: str | None = None,
          limits: Limits = DEFAULT_LIMITS) -> None:
    """Serve the export in `exports`; `git_rev` is the commit that holds it (None: not known to be
    committed), reported by /metadata."""
    import uvicorn

    model, signature = load_exported(exports, threads)
    uvicorn.run(create_app(model, {**signature, "git_rev": git_rev}, limits), host=host, port=port, log_level="info",
                http=head_deadline_protocol(limits.head_timeout_s))


def serve_revision(repo: Path, rev: str, exports: Path, host: str, port: int, threads: int = 0,
                   limits: Limits = DEFAULT_LIMITS) -> None:
    from pipelines.dvcrepo import git

    with tempfile.TemporaryDirectory(prefix="cifar10-api-") as tmp:
        folder = exports_at(repo, rev, exports, Path(tmp) / "export")
        serve(folder, host, port, threads, git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}"), limits)


def serve_workspace(repo: Path, exports: Path, host: str, port: int, threads: int = 0,
                    limits: Limits = DEFAULT_LIMITS) -> None:
    """The workspace's export, named by HEAD when HEAD's dvc.lock records this very export."""
    serve(repo / exports, host, port, threads, committed_at_head(repo, exports), limits)


def committed_at_head(repo: Path, exports: Path) -> str | None:
    import yaml

    from pipelines.dvcrepo import git

    def export_hash(lock_text: str | None) -> object:
        try:
            lock = yaml.safe_load(lock_text or "") or {}
            return next((out.get("md5") for entry in lock.get("stages", {}).values() for out in entry.get("outs", [])
                         if out.get("path") == exports.as_posix()), None)
        except (yaml.YAMLError, AttributeError):
            return None

    lock = repo / "dvc.lock"
    here = export_hash(lock.read_text() if lock.is_file() else None)
    if here is None or export_hash(git(repo, "show", "HEAD:dvc.lock")) != here:
        return None
    return git(repo, "rev-parse", "HEAD")

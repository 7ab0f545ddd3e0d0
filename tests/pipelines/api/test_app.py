"""The inference API as a user runs it: `cifar10-pipeline api` on 127.0.0.1, real HTTP requests."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import REPO, inference_api
from tests.pipelines.conftest import CLASSES

pytestmark = pytest.mark.slow  # starts the inference API



@pytest.fixture(scope="module")
def server(exported):
    """The real server process; yields (base URL, pid)."""
    with inference_api("--model", str(exported)) as running:
        yield running


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_metadata_and_docs(server):
    url, _ = server
    assert httpx.get(f"{url}/health").json() == {"status": "ok", "version": "0000000-ffffffff"}
    meta = httpx.get(f"{url}/metadata").json()
    assert meta["classes"] == CLASSES and meta["test_accuracy"] == 0.5 and meta["onnx_opset"] == 17
    assert meta["input"]["shape"] == [None, 32, 32, 3] and meta["input"]["range"] == [0, 255]
    assert httpx.get(f"{url}/docs").status_code == 200
    assert "/predict" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_many_images_of_any_size_and_mode_in_one_request(server, exported, tmp_path):
    from pipelines.predict import predict_files

    images = {"gray.png": Image.new("L", (100, 60), 90), "rgba.png": Image.new("RGBA", (16, 16), (200, 10, 10, 128)),
              "photo.jpg": Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8))}
    files = []
    for name, image in images.items():
        image.save(tmp_path / name)
        files.append(("files", (name, (tmp_path / name).read_bytes())))
    response = httpx.post(f"{server[0]}/predict", params={"top_k": 2}, files=files)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [p["file"] for p in predictions] == list(images)
    # The same decoding and model as `cifar10-pipeline predict`: the same answers.
    for served, (path, ranked) in zip(predictions, predict_files([tmp_path / n for n in images], exported, 2)):
        assert [(c["class"], c["probability"]) for c in served["top_k"]] == [(c, round(p, 6)) for c, p in ranked]
        assert served["class"] == ranked[0][0] and len(served["top_k"]) == 2


@pytest.mark.parametrize("files, status, detail", [
    ([("files", ("notes.txt", b"not an image"))], 415, "notes.txt is not a readable image"),
    ([("files", ("empty.png", b""))], 400, "empty.png is empty; send an image file"),
    ([("files", ("huge.png", b"\0" * (10 * 1024 * 1024 + 1)))], 413, "huge.png is larger than 10 MiB"),
    ([("files", (f"{i}.png", png(Image.new("RGB", (8, 8))))) for i in range(65)], 413, "65 files in one request"),
    ([], 422, "files: Field required"),
])
def test_bad_input_is_a_4xx_with_one_line_and_the_server_keeps_serving(server, files, status, detail):
    url, _ = server
    response = httpx.post(f"{url}/predict", files=files, data={} if files else {"x": "1"})
    assert response.status_code == status
    message = response.json()["detail"]
    assert message.startswith(detail) and "\n" not in message
    good = httpx.post(f"{url}/predict", files=[("files", ("ok.png", png(Image.new("RGB", (32, 32), (9, 99, 199)))))])
    assert good.status_code == 200 and good.json()["predictions"][0]["class"] in CLASSES


def test_the_server_never_loads_tensorflow(server):
    _, pid = server
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "onnxruntime" in maps and "tensorflow" not in maps


def test_latency_benchmark_reports_each_concurrency(server):
    script = REPO / "benchmarks/api_latency.py"
    result = subprocess.run([sys.executable, str(script), "--url", server[0], "--requests", "16",
                             "--concurrency", "1", "--concurrency", "8", "--json"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["concurrency"] for r in rows] == [1, 8]
    for row in rows:
        assert row["requests"] == 16 and row["errors"] == 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] and row["requests_per_s"] > 0


@pytest.mark.parametrize("page", ["docs", "redoc"])
def test_the_docs_pages_draw_offline(server, tmp_path, page):
    """/docs and /redoc loaded Swagger UI and Redoc from a CDN: blank without the internet."""
    from tests.helpers import not_blank, visit

    url, _ = server
    seen = visit(f"{url}/{page}", tmp_path / "browser", wait_for_text="/predict")
    assert seen.external() == [] and seen.failed == [], (seen.external(), seen.failed)
    assert "/predict" in seen.text and not_blank(seen.screenshot)


def test_top_k_as_a_multipart_field_and_one_default_with_the_cli(server):
    """The README documents multipart `files` and `top_k`; a top_k form field was silently ignored,
    and the API (3) and `predict` (1) defaulted to different k."""
    from pipelines.predict import DEFAULT_TOP_K

    image = {"files": ("a.png", png(Image.new("RGB", (32, 32), (10, 200, 30))), "image/png")}
    as_field = httpx.post(f"{server[0]}/predict", data={"top_k": "2"}, files=image).json()
    assert len(as_field["predictions"][0]["top_k"]) == 2
    default = httpx.post(f"{server[0]}/predict", files=image).json()
    assert len(default["predictions"][0]["top_k"]) == DEFAULT_TOP_K
    help_text = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", "--help"], capture_output=True,
                               text=True, env={"COLUMNS": "200", "PATH": ""}).stdout
    assert f"[default: {DEFAULT_TOP_K}]" in help_text, help_text

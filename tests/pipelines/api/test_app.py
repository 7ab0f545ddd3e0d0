"""The inference API as a user runs it: `cifar10-pipeline api` on 127.0.0.1, real HTTP requests."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from tests.helpers import REPO, inference_api
from tests.pipelines.conftest import CLASSES
from tests.synthetic import png_bytes

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
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["version"] == "0000000-ffffffff"
    meta = httpx.get(f"{url}/metadata").json()
    assert meta["classes"] == CLASSES and meta["test_accuracy"] == 0.5 and meta["onnx_opset"] == 17
    assert meta["input"]["shape"] == [None, 32, 32, 3] and meta["input"]["range"] == [0, 255]
    assert httpx.get(f"{url}/docs").status_code == 200
    assert "/predict" in httpx.get(f"{url}/openapi.json").json()["paths"]


def test_the_test_accuracy_shown_is_the_served_model_s():
    """The evaluation averages views of each image (test-time augmentation) and the server does not:
    the mirror's default model scored 0.908 in evaluate and 0.8978 as served."""
    from pipelines.api.app import served_test_accuracy

    evaluated = {"metrics": {"accuracy": 0.908, "split": "test"}}
    assert served_test_accuracy({**evaluated, "served": {"accuracy": 0.8978, "split": "test"}}) == 0.8978
    assert served_test_accuracy(evaluated) == 0.908  # an export made before the stage measured it
    assert served_test_accuracy({"metrics": {"accuracy": 0.9, "split": "val"}}) is None


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
    rows = json.loads(result.stdout)["rows"]
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


def synthetic_test_images(n_per_class: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    from tests.synthetic import make_images

    return make_images(n_per_class, CLASSES, seed=seed)


def metric(text: str, name: str) -> float:
    """The value of one sample line of a Prometheus exposition, by its full name and labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def test_concurrent_requests_are_batched_and_answered_as_one_at_a_time(server, exported):
    """Requests sent at once share model calls (the batch histogram says so), and each image's answer
    is the one the model gives it alone."""
    import asyncio

    from stages.common.serving import load_exported

    images, _ = synthetic_test_images(8)
    url = server[0]
    before = httpx.get(f"{url}/metrics").text

    async def send_all() -> list[dict]:
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(http.post(f"{url}/predict", params={"top_k": 4},
                                                    files=[("files", (f"{i}.png", png_bytes(image)))])
                                          for i, image in enumerate(images)))

    responses = asyncio.run(send_all())
    model, _ = load_exported(exported)
    for image, response in zip(images, responses):
        assert response.status_code == 200, response.text
        alone = model.probabilities(image[None].astype(np.float32))[0]
        served = {c["class"]: c["probability"] for c in response.json()["predictions"][0]["top_k"]}
        assert served == {name: round(float(p), 6) for name, p in zip(CLASSES, alone)}
    after = httpx.get(f"{url}/metrics").text
    calls = metric(after, "cifar10_api_batch_images_count") - metric(before, "cifar10_api_batch_images_count")
    answered = metric(after, "cifar10_api_batch_images_sum") - metric(before, "cifar10_api_batch_images_sum")
    assert answered == len(images) and calls < len(images), (calls, answered)


def test_pixels_as_npy_or_raw_bytes_are_answered_as_the_same_images_are(server):
    images, _ = synthetic_test_images(2)
    url = server[0]
    as_files = httpx.post(f"{url}/predict", files=[("files", (f"{i}.png", png_bytes(image)))
                                                   for i, image in enumerate(images)]).json()["predictions"]
    npy = io.BytesIO()
    np.save(npy, images)
    as_npy = httpx.post(f"{url}/predict/pixels", content=npy.getvalue(), headers={"Content-Type": "application/x-npy"})
    as_raw = httpx.post(f"{url}/predict/pixels", params={"top_k": 1}, content=images.tobytes(),
                        headers={"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, images.shape))})
    assert as_npy.status_code == 200 and as_raw.status_code == 200, (as_npy.text, as_raw.text)
    assert [p["top_k"] for p in as_npy.json()["predictions"]] == [p["top_k"] for p in as_files]
    assert [p["file"] for p in as_npy.json()["predictions"]] == [str(i) for i in range(len(images))]
    assert [p["top_k"] for p in as_raw.json()["predictions"]] == [p["top_k"][:1] for p in as_files]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy header claiming `shape` uint8, followed by one image's bytes."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "|u1", "fortran_order": False, "shape": shape})
    return buffer.getvalue() + bytes(3072)


@pytest.mark.parametrize("body, headers, status, detail", [
    (b"not an array", {"Content-Type": "application/x-npy"}, 415, "the body is not a readable .npy array"),
    # A header that claims 3 TB: np.load would try to allocate it before reading what follows.
    (npy_header((10**9, 32, 32, 3)), {"Content-Type": "application/x-npy"}, 415,
     ("the body is not a readable .npy array (its header describes (1000000000, 32, 32, 3) uint8 but 3072 "
      "bytes follow)")),
    (npy_bytes(np.zeros((2, 28, 28, 3), np.uint8)), {"Content-Type": "application/x-npy"}, 422,
     "pixels of shape (2, 28, 28, 3) and dtype uint8; send (N, 32, 32, 3) uint8"),
    (npy_bytes(np.zeros((2, 32, 32, 3), np.float32)), {"Content-Type": "application/x-npy"}, 422,
     "pixels of shape (2, 32, 32, 3) and dtype float32"),
    (b"\0" * 3000, {"Content-Type": "application/octet-stream", "X-Shape": "1,32,32,3"}, 422,
     "X-Shape '1,32,32,3' does not describe the 3000 bytes sent"),
    (b"\0" * 3072, {"Content-Type": "application/octet-stream"}, 422, "X-Shape 'None' does not describe"),
    (b"{}", {"Content-Type": "application/json"}, 415, "Content-Type 'application/json' is not taken here"),
])
def test_bad_pixels_are_a_4xx_with_one_line(server, body, headers, status, detail):
    response = httpx.post(f"{server[0]}/predict/pixels", content=body, headers=headers)
    assert response.status_code == status and response.json()["detail"].startswith(detail), response.text
    assert "\n" not in response.json()["detail"]


def test_drift_turns_health_degraded_and_metrics_show_it(exported):
    """A stream of test-like images keeps /health "ok"; darkened ones, then grayscale ones, turn it
    "degraded" with the reason; /metrics counts the requests, batches and classes answered."""
    images, labels = synthetic_test_images(16)  # 64 images, the window
    with inference_api("--model", str(exported), "--drift-window", "64", "--drift-threshold", "0.4") as (url, _):
        def send(pixels: np.ndarray) -> dict:
            response = httpx.post(f"{url}/predict/pixels", content=npy_bytes(pixels.astype(np.uint8)),
                                  headers={"Content-Type": "application/x-npy"})
            assert response.status_code == 200, response.text
            return httpx.get(f"{url}/health").json()

        healthy = send(images)
        assert healthy["status"] == "ok" and healthy["drift"]["images"] == 64 and healthy["drift"]["score"] < 0.2
        dark = send(images * 0.4)
        assert dark["status"] == "degraded" and dark["reason"].startswith("input drift: the last 64 images")
        gray = send((images @ np.array([0.299, 0.587, 0.114]))[..., None].repeat(3, axis=-1))
        assert gray["status"] == "degraded" and gray["drift"]["score"] > 0.9
        text = httpx.get(f"{url}/metrics").text
    print("\n".join(line for line in text.splitlines() if line.startswith("cifar10_api") and " 0.0" not in line))
    assert metric(text, 'cifar10_api_requests_total{route="/predict/pixels",status="200"}') == 3
    assert metric(text, 'cifar10_api_requests_total{route="/health",status="200"}') >= 3  # and the start-up probes
    assert metric(text, "cifar10_api_batch_images_sum") == 3 * len(images)
    per_class = [metric(text, f'cifar10_api_predictions_total{{class="{name}"}}') for name in CLASSES]
    assert sum(per_class) == 3 * len(images) and per_class[labels[0]] >= 16
    assert metric(text, "cifar10_api_drift_score") > 0.9
    assert 'cifar10_api_model_info{git_rev="None",test_accuracy="0.5",version="0000000-ffffffff"} 1.0' in text


def test_the_demo_page_shows_an_uploaded_image_s_class_offline(server, tmp_path):
    from tests.helpers import not_blank, visit

    images, labels = synthetic_test_images(1)
    upload = tmp_path / "test-image.png"
    Image.fromarray(images[2]).save(upload)
    seen = visit(server[0] + "/", tmp_path / "browser", wait_for_text="Model version",
                 upload=("#files", [upload], f"test-image.png: {CLASSES[labels[2]]}"))
    assert seen.external() == [] and seen.failed == [], (seen.external(), seen.failed)
    assert f"test-image.png: {CLASSES[labels[2]]}" in seen.text, seen.text
    assert "test accuracy 50.00%" in seen.text and seen.images == (1, 1) and not_blank(seen.screenshot)


def test_workers_share_the_port_and_their_metrics(exported):
    with inference_api("--model", str(exported), "--workers", "2") as (url, pid):
        answered = [httpx.post(f"{url}/predict", files=[("files", ("a.png", png(Image.new("RGB", (32, 32)))))])
                    for _ in range(8)]
        assert all(r.status_code == 200 for r in answered)
        workers = [p for p in psutil.Process(pid).children(recursive=True) if "spawn" in " ".join(p.cmdline())]
        text = httpx.get(f"{url}/metrics").text
    assert len(workers) == 2
    assert metric(text, 'cifar10_api_requests_total{route="/predict",status="200"}') == 8

"""The API's drift verdict on real test images: /health after streams of 256 normal, single-class,
darkened and grayscale CIFAR-10 test images (16 PNGs per request), and /metrics after them.

    python api-drift-probe.py EXPORT TEST_NPZ
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from api_latency import started_server


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def stream(url: str, images: np.ndarray) -> dict:
    for start in range(0, len(images), 16):
        files = [("files", (f"{i}.png", png(image))) for i, image in enumerate(images[start:start + 16])]
        httpx.post(f"{url}/predict", files=files, timeout=60).raise_for_status()
    return httpx.get(f"{url}/health").json()


def main() -> None:
    export, test = Path(sys.argv[1]), np.load(sys.argv[2])
    images, labels = test["images"], test["labels"]
    rng = np.random.default_rng(0)
    normal = images[rng.choice(len(images), 256, replace=False)]
    streams = {
        "normal": normal,
        "one class (frog)": images[labels == 6][:256],
        "darkened (x0.5)": normal * 0.5,
        "grayscale": (normal @ np.array([0.299, 0.587, 0.114]))[..., None].repeat(3, axis=-1),
        "normal again": images[rng.choice(len(images), 256, replace=False)],
    }
    results = {}
    with started_server(export, []) as (url, _):
        for name, pixels in streams.items():
            results[name] = stream(url, pixels)
        metrics = httpx.get(f"{url}/metrics").text
    excerpt = [line for line in metrics.splitlines() if line.startswith("cifar10_api") and "_created" not in line
               and "_bucket" not in line]
    print(json.dumps({"health_after_each_stream": results, "metrics_excerpt": excerpt}, indent=1))


if __name__ == "__main__":
    main()

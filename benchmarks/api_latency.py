"""Latency and throughput of the inference API (`cifar10-pipeline api`) under concurrent clients.

Each of C clients sends one-image POST /predict requests back to back until the run's bounded
number of requests is spent; prints p50/p99 latency and requests per second per concurrency.

    cifar10-pipeline api &                       # serves the pipeline's export on 127.0.0.1:8000
    python benchmarks/api_latency.py --url http://127.0.0.1:8000 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time

import httpx
import numpy as np
from PIL import Image

from stages.common.errors import TransientError, run_main


def sample_png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def measure(url: str, requests: int, concurrency: int, image: bytes) -> dict:
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors
        for _ in remaining:  # one shared iterator: the clients split the bounded total between them
            started = time.perf_counter()
            response = await http.post(f"{url}/predict", files=[("files", ("x.png", image, "image/png"))])
            latencies.append(time.perf_counter() - started)
            errors += response.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "requests_per_s": round(len(latencies) / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the API's base URL")
    parser.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, action="append", help="clients at once (repeatable; default 1 8 64)")
    parser.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    args = parser.parse_args()
    try:
        httpx.get(f"{args.url}/health", timeout=5).raise_for_status()
    except httpx.HTTPError as err:
        raise TransientError(f"no API answers at {args.url} ({err}); start one with `cifar10-pipeline api`") from None
    image = sample_png()
    asyncio.run(measure(args.url, min(args.requests, 20), 1, image))  # warm-up: sessions, connections
    rows = [asyncio.run(measure(args.url, args.requests, c, image)) for c in args.concurrency or [1, 8, 64]]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| clients | requests | errors | p50 ms | p99 ms | requests/s |\n|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']} | {r['p99_ms']} | {r['requests_per_s']} |")


if __name__ == "__main__":
    run_main(main)

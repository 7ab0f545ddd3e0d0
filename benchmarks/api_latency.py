"""Latency and throughput of the inference API (`cifar10-pipeline api`) under concurrent clients.

Each of C clients holds one keep-alive connection and sends one-image POST /predict requests back
to back until the level's bounded number of requests is spent; per level: p50/p99 latency,
requests/s, errors, the client's own CPU time (it shares the machine's cores with the server) and
the server's memory before and after.

With `--model EXPORT` the script starts the servers itself, one after the other on the same
cores: the batched server (the default) and the unbatched path (`--max-batch 1`), and measures
bare ONNX Runtime on the same model at the server's batch size, the ceiling:

    python benchmarks/api_latency.py --model EXPORT --json > api-latency.json   # EXPORT: dvc.yaml's paths.exports

With `--url` it measures a server that is already running:

    cifar10-pipeline api &
    python benchmarks/api_latency.py --url http://127.0.0.1:8000 --requests 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import psutil
from PIL import Image

from pipelines.api.settings import Batching
from stages.common.errors import ConfigError, TransientError, run_main

BOUNDARY = "cifar10-benchmark-boundary"
LEVELS = [1, 8, 64, 256]
SERVERS = {"batched": "", "unbatched": "--max-batch 1"}


def sample_png(seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def predict_request(host: str, image: bytes) -> bytes:
    """One HTTP/1.1 multipart POST /predict, built once: the client spends its CPU on sending."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    await reader.readexactly(length)
    return status


async def measure(url: str, requests: int, concurrency: int, image: bytes) -> dict:
    parts = urlsplit(url)
    request = predict_request(parts.netloc, image)
    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))

    async def client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            for _ in remaining:  # one shared iterator: the clients split the bounded total between them
                started = time.perf_counter()
                try:
                    writer.write(request)
                    status = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError):
                    errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                    continue
                latencies.append(time.perf_counter() - started)
                errors += status != 200
        finally:
            writer.close()

    cpu = time.process_time()
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    ms = np.array(latencies or [float("nan")]) * 1000
    return {"concurrency": concurrency, "requests": len(latencies), "errors": errors,
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "requests_per_s": round(len(latencies) / wall, 1), "seconds": round(wall, 1),
            "client_cpu_s": round(time.process_time() - cpu, 2)}


def rss_mib(pid: int) -> float:
    """The server's resident memory, its worker processes included."""
    process = psutil.Process(pid)
    return round(sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20, 1)


def measure_levels(url: str, pid: int | None, requests: int, levels: list[int]) -> list[dict]:
    image = sample_png()
    asyncio.run(measure(url, 50, 4, image))  # warm-up: sessions, connections, the first batches
    rows = []
    for concurrency in levels:
        before = rss_mib(pid) if pid else None
        row = asyncio.run(measure(url, requests, concurrency, image))
        rows.append({**row, "server_rss_mib_before": before, "server_rss_mib_after": rss_mib(pid) if pid else None})
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def started_server(exports: Path, options: list[str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "api", "--model", str(exports), "--port", str(port),
                             *options], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise TransientError(f"the API did not start: {proc.communicate()[1][-2000:]}")
            time.sleep(0.3)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def bare_onnx_runtime(exports: Path, batch: int, seconds: float = 10.0) -> dict:
    """Images/s of the same model in ONNX Runtime, no server: batches of `batch` back to back."""
    from stages.common.serving import load_exported

    model, _ = load_exported(exports)
    pixels = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 3)).astype(np.float32)
    model.probabilities(pixels)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        model.probabilities(pixels)
        done += batch
    return {"batch": batch, "images_per_s": round(done / (time.perf_counter() - started), 1)}


def table(rows: list[dict]) -> str:
    lines = ["| path | clients | requests | errors | p50 ms | p99 ms | requests/s | client CPU s | server RSS MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        rss = f"{r['server_rss_mib_before']} -> {r['server_rss_mib_after']}" if r["server_rss_mib_before"] else "-"
        lines.append(f"| {r.get('path', '-')} | {r['concurrency']} | {r['requests']} | {r['errors']} | {r['p50_ms']} "
                     f"| {r['p99_ms']} | {r['requests_per_s']} | {r['client_cpu_s']} | {rss} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="an API already running (default http://127.0.0.1:8000)")
    where.add_argument("--model", type=Path, help="an export folder (dvc.yaml's paths.exports): start the batched and "
                                                       "unbatched servers on it")
    parser.add_argument("--requests", type=int, default=1000, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, action="append", help=f"clients at once (repeatable; default "
                                                                         f"{' '.join(map(str, LEVELS))})")
    parser.add_argument("--server", action="append", metavar="NAME=OPTIONS",
                        help="with --model: a server to measure and its `api` options (repeatable; default "
                             + ", ".join(f"'{name}={options}'" for name, options in SERVERS.items()) + ")")
    parser.add_argument("--json", action="store_true", help="print JSON instead of Markdown tables")
    args = parser.parse_args()
    levels = args.concurrency or LEVELS
    if args.model is None:
        url = args.url or "http://127.0.0.1:8000"
        try:
            httpx.get(f"{url}/health", timeout=5).raise_for_status()
        except httpx.HTTPError as err:
            raise TransientError(f"no API answers at {url} ({err}); start one with `cifar10-pipeline api`") from None
        result = {"rows": measure_levels(url, None, args.requests, levels)}
    else:
        if not args.model.is_dir():
            raise ConfigError(f"--model {args.model} is not a folder; pass an export folder (dvc.yaml's paths.exports)")
        servers = dict(spec.partition("=")[::2] for spec in args.server) if args.server else SERVERS
        rows = []
        for path, options in servers.items():
            with started_server(args.model, options.split()) as (url, pid):
                rows += [{"path": path, **row} for row in measure_levels(url, pid, args.requests, levels)]
        result = {"rows": rows, "bare_onnx_runtime": bare_onnx_runtime(args.model, Batching.max_batch),
                  "cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0))}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(table(result["rows"]))
    if "bare_onnx_runtime" in result:
        bare = result["bare_onnx_runtime"]
        print(f"\nbare ONNX Runtime, batches of {bare['batch']}: {bare['images_per_s']} images/s")


if __name__ == "__main__":
    run_main(main)

"""What the inference API serves, as Prometheus metrics, and whether its inputs still look like the
data the model was tested on.

Drift: each image's RGB pixels are summed up as a Gaussian (mean and covariance); the last
`window` images' fit is compared with the export's test split (signature.json, input.statistics)
by the Hellinger distance between the two normal distributions, 0 for the same and 1 for
disjoint. Darkened images move the mean and shrink the covariance; grayscale ones make it
singular (distance near 1); a stream of one class's images stays well below the default threshold.
With `--workers N` each worker judges the requests it answers.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from pipelines.api.settings import Drift
from stages.common.colour import pixel_moments

CHANNELS = ("red", "green", "blue")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def hellinger_gaussians(mean_a: np.ndarray, cov_a: np.ndarray, mean_b: np.ndarray, cov_b: np.ndarray) -> float:
    """The Hellinger distance between N(mean_a, cov_a) and N(mean_b, cov_b), in 0..1."""
    average = (cov_a + cov_b) / 2
    signs, logdets = zip(*(np.linalg.slogdet(c) for c in (cov_a, cov_b, average)))
    if min(signs) <= 0:  # a degenerate fit (e.g. grayscale: the channels are one) shares no volume
        return 1.0
    gap = mean_a - mean_b
    log_coefficient = (logdets[0] + logdets[1]) / 4 - logdets[2] / 2 - gap @ np.linalg.solve(average, gap) / 8
    return float(np.sqrt(max(0.0, 1.0 - np.exp(log_coefficient))))


class DriftMonitor:
    """The running colour statistics of the last `policy.window` images and their distance to the
    reference; thread-safe (images are added on the model's thread, read on the event loop)."""

    def __init__(self, reference: dict[str, Any] | None, policy: Drift) -> None:
        self.policy = policy
        self.images: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=policy.window)
        self.pixels_per_image = 1
        self.lock = threading.Lock()
        self.compare_with(reference)

    def compare_with(self, reference: dict[str, Any] | None) -> None:
        """A new reference (another model's export) and an empty window."""
        with self.lock:
            self.reference = None if not reference else (np.asarray(reference["mean"], dtype=np.float64),
                                                         np.asarray(reference["covariance"], dtype=np.float64))
            self.images.clear()

    def add(self, pixels: np.ndarray) -> None:
        sums, outer, self.pixels_per_image = pixel_moments(pixels)
        with self.lock:
            self.images.extend(zip(sums, outer))

    def window_fit(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        with self.lock:
            seen = len(self.images)
            if not seen:
                return None
            sums = sum(s for s, _ in self.images)
            outer = sum(o for _, o in self.images)
        count = seen * self.pixels_per_image
        mean = sums / count
        return seen, mean, outer / count - np.outer(mean, mean)

    def state(self, fit: tuple[int, np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
        """For /health: the verdict and what it rests on (`fit`: the window's, when already taken)."""
        if self.reference is None:
            return {"status": "ok", "drift": None,
                    "reason": "the export has no colour statistics (exported before they were added): re-export it"}
        fit = fit or self.window_fit()
        seen = fit[0] if fit else 0
        if fit is None or seen < self.policy.min_images:
            return {"status": "ok", "drift": {"score": None, "images": seen, "threshold": self.policy.threshold}}
        score = round(hellinger_gaussians(fit[1], fit[2], *self.reference), 4)
        drift = {"score": score, "images": seen, "threshold": self.policy.threshold,
                 "test": "Hellinger distance between Gaussian fits of the RGB pixels, last images vs the test split"}
        if score <= self.policy.threshold:
            return {"status": "ok", "drift": drift}
        mean = ", ".join(f"{c} {m:.0f} (test split {r:.0f})" for c, m, r in zip(CHANNELS, fit[1], self.reference[0]))
        return {"status": "degraded", "drift": drift,
                "reason": f"input drift: the last {seen} images' colours are {score:.2f} from the test split's "
                          f"(threshold {self.policy.threshold}); channel means {mean}"}


class Metrics:
    """The server's Prometheus metrics. With several worker processes, PROMETHEUS_MULTIPROC_DIR is
    set (pipelines/api/server.py) and /metrics adds up every worker's files."""

    def __init__(self, classes: list[str], drift: DriftMonitor) -> None:
        self.registry = CollectorRegistry()
        self.drift = drift
        reg = self.registry
        self.requests = Counter("cifar10_api_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=reg)
        self.latency = Histogram("cifar10_api_request_seconds", "Time to answer a request, by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=reg)
        self.batch_images = Histogram("cifar10_api_batch_images", "Images per model call", buckets=BATCH_BUCKETS,
                                      registry=reg)
        self.predictions = Counter("cifar10_api_predictions", "Images answered, by their likeliest class", ["class"],
                                   registry=reg)
        for name in classes:
            self.predictions.labels(name)
        self.model_info = Gauge("cifar10_api_model_info", "The model served (1; 0 for one served before), its "
                                "version, commit and test accuracy", ["version", "git_rev", "test_accuracy"],
                                registry=reg, multiprocess_mode="max")
        self.channel_mean = Gauge("cifar10_api_input_channel_mean", "Mean pixel value (0..255) of the drift window",
                                  ["channel"], registry=reg, multiprocess_mode="all")
        self.channel_std = Gauge("cifar10_api_input_channel_std", "Pixel standard deviation of the drift window",
                                 ["channel"], registry=reg, multiprocess_mode="all")
        self.reference_mean = Gauge("cifar10_api_reference_channel_mean", "Mean pixel value of the test split",
                                    ["channel"], registry=reg, multiprocess_mode="max")
        self.drift_score = Gauge("cifar10_api_drift_score", "Hellinger distance of the drift window to the test "
                                 "split (NaN before enough images)", registry=reg, multiprocess_mode="all")
        self.model_labels: tuple[str, str, str] | None = None

    def show_model(self, signature: dict[str, Any], test_accuracy: float | None) -> None:
        """The model now served, in model_info and the reference gauges."""
        if self.model_labels is not None:
            self.model_info.labels(*self.model_labels).set(0)
        self.model_labels = (str(signature.get("version")), str(signature.get("git_rev")), str(test_accuracy))
        self.model_info.labels(*self.model_labels).set(1)
        if self.drift.reference is not None:
            for channel, value in zip(CHANNELS, self.drift.reference[0]):
                self.reference_mean.labels(channel).set(value)

    def observe_batch(self, images: int) -> None:
        self.batch_images.observe(images)

    def observe_answers(self, probabilities: np.ndarray, classes: list[str]) -> None:
        for index, count in zip(*np.unique(probabilities.argmax(axis=1), return_counts=True)):
            self.predictions.labels(classes[index]).inc(int(count))

    def exposition(self) -> bytes:
        """The text format, the drift gauges brought up to date first."""
        fit = self.drift.window_fit()
        if fit is not None:
            for channel, mean, var in zip(CHANNELS, fit[1], np.diag(fit[2])):
                self.channel_mean.labels(channel).set(mean)
                self.channel_std.labels(channel).set(np.sqrt(max(var, 0.0)))
        score = (self.drift.state(fit).get("drift") or {}).get("score")
        self.drift_score.set(float("nan") if score is None else score)
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            combined = CollectorRegistry()
            MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware counting each request by route template (bounded labels, unlike paths) and
    status, and timing it. Plain ASGI: Starlette's BaseHTTPMiddleware costs a task per request."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500

        async def noting_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)

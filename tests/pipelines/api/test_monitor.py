"""The drift score and verdict, on images shaped like the synthetic test data."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.api.monitor import DriftMonitor, hellinger_gaussians
from pipelines.api.settings import Drift
from stages.common.colour import colour_statistics
from tests.synthetic import make_images

REFERENCE_IMAGES, _ = make_images(20)
REFERENCE = colour_statistics(REFERENCE_IMAGES)


def grayscale(images: np.ndarray) -> np.ndarray:
    return (images @ np.array([0.299, 0.587, 0.114]))[..., None].repeat(3, axis=-1)


def test_hellinger_distance_of_gaussians():
    mean, cov = np.array([120.0, 120, 110]), np.diag([3600.0, 3500, 4000])
    assert hellinger_gaussians(mean, cov, mean, cov) == pytest.approx(0, abs=1e-7)
    # One dimension, equal variances: H^2 = 1 - exp(-d^2 / (8 var)).
    one = hellinger_gaussians(np.array([0.0]), np.array([[4.0]]), np.array([2.0]), np.array([[4.0]]))
    assert one == pytest.approx(np.sqrt(1 - np.exp(-4 / 32)))
    assert hellinger_gaussians(mean, cov, mean + 1000, cov) == pytest.approx(1, abs=1e-6)
    singular = np.ones((3, 3)) * 3600
    assert hellinger_gaussians(mean, singular, mean, cov) == 1.0


@pytest.mark.parametrize("stream, status", [
    (lambda x: x, "ok"),
    (lambda x: x * 0.5, "degraded"),
    (grayscale, "degraded"),
])
def test_the_verdict_follows_the_stream(stream, status):
    monitor = DriftMonitor(REFERENCE, Drift(window=64, min_images=32, threshold=0.4))
    assert monitor.state()["drift"]["score"] is None  # no verdict before min_images
    fresh, _ = make_images(8, seed=5)
    monitor.add(stream(fresh.astype(np.float64)))
    state = monitor.state()
    assert state["status"] == status and state["drift"]["images"] == 64
    assert (state["drift"]["score"] > 0.4) == (status == "degraded")
    if status == "degraded":
        assert state["reason"].startswith("input drift: the last 64 images' colours are") and "\n" not in state["reason"]


def test_the_window_forgets_what_came_before_it():
    monitor = DriftMonitor(REFERENCE, Drift(window=40, min_images=40))
    fresh, _ = make_images(4, seed=6)
    monitor.add(fresh * 0.3)
    assert monitor.state()["status"] == "degraded"
    monitor.add(fresh)
    assert monitor.state()["status"] == "ok"


def test_an_export_without_statistics_is_served_without_a_verdict():
    state = DriftMonitor(None, Drift()).state()
    assert state["status"] == "ok" and state["drift"] is None and "re-export" in state["reason"]

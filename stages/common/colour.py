"""The colour distribution of images as a Gaussian over RGB (mean and covariance), additive across
images: the export ships the test split's, and the inference API compares what it is sent with it
(pipelines/api/monitor.py)."""

from __future__ import annotations

from typing import Any

import numpy as np


def pixel_moments(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Per image, the sum of its RGB pixel values (N, 3) and of their outer products (N, 3, 3), and
    the pixels per image."""
    flat = np.asarray(pixels, dtype=np.float64).reshape(len(pixels), -1, 3)
    return flat.sum(axis=1), np.einsum("npi,npj->nij", flat, flat), flat.shape[1]


def colour_statistics(images: np.ndarray, chunk: int = 1000) -> dict[str, Any]:
    """The mean and covariance of the images' RGB pixels (0..255)."""
    sums, outer, count = np.zeros(3), np.zeros((3, 3)), 0
    for start in range(0, len(images), chunk):
        s, o, per_image = pixel_moments(images[start:start + chunk])
        sums, outer, count = sums + s.sum(axis=0), outer + o.sum(axis=0), count + per_image * len(s)
    mean = sums / max(count, 1)
    covariance = outer / max(count, 1) - np.outer(mean, mean)
    return {"mean": mean.round(4).tolist(), "covariance": covariance.round(4).tolist(), "images": len(images)}

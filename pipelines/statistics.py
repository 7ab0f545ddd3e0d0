"""The statistics behind `compare` and the gate: bootstrap intervals, McNemar's exact test on
paired predictions, and the verdict they support."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from stages.common.render import report_classes

ALPHA = 0.05  # significance level of McNemar's test, for compare's verdict and the gate


def bootstrap_interval(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (per-image 0/1, or paired differences)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """(A right & B wrong, A wrong & B right, exact two-sided p) on paired predictions."""
    from scipy.stats import binomtest

    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return only_a, only_b, p


def verdict(name_a: str, name_b: str, difference: float, p: float | None, alpha: float = ALPHA) -> str:
    if p is None:
        return "no paired predictions: significance unknown"
    if p >= alpha or difference == 0:
        return f"difference within noise (p={p:.3g})"
    better = name_b if difference > 0 else name_a
    return f"{better} is better, p={p:.3g}"


@dataclass(frozen=True)
class Uncertainty:
    accuracy_a: float
    interval_a: tuple[float, float]
    accuracy_b: float
    interval_b: tuple[float, float]
    difference: float
    interval_difference: tuple[float, float] | None
    only_a: int | None
    only_b: int | None
    p_value: float | None
    verdict: str


def paired(pred_a: pd.DataFrame | None, pred_b: pd.DataFrame | None) -> bool:
    """Both runs predicted the same images, in the same order: paired tests apply."""
    if pred_a is None or pred_b is None or len(pred_a) != len(pred_b):
        return False
    return bool((pred_a["actual"].to_numpy() == pred_b["actual"].to_numpy()).all())


def uncertainty(pred_a: pd.DataFrame, pred_b: pd.DataFrame, name_a: str, name_b: str, seed: int = 0) -> Uncertainty:
    """Intervals for each run; the paired interval and McNemar when both saw the same images."""
    correct_a = (pred_a["actual"] == pred_a["predicted"]).to_numpy()
    correct_b = (pred_b["actual"] == pred_b["predicted"]).to_numpy()
    acc_a, acc_b = float(correct_a.mean()), float(correct_b.mean())
    if paired(pred_a, pred_b):
        diff_interval = bootstrap_interval(correct_b.astype(float) - correct_a.astype(float), seed=seed)
        only_a, only_b, p = mcnemar(correct_a, correct_b)
    else:
        diff_interval, only_a, only_b, p = None, None, None, None
    return Uncertainty(
        acc_a, bootstrap_interval(correct_a.astype(float), seed=seed),
        acc_b, bootstrap_interval(correct_b.astype(float), seed=seed),
        acc_b - acc_a, diff_interval, only_a, only_b, p, verdict(name_a, name_b, acc_b - acc_a, p),
    )


def per_class_changes(report_a: dict, report_b: dict) -> pd.DataFrame:
    classes = [c for c in report_classes(report_b) if c in report_a]
    rows = []
    for c in classes:
        row = {"class": c}
        for key, label in (("precision", "precision"), ("recall", "recall"), ("f1-score", "F1")):
            row[label] = report_b[c][key]
            row[f"Δ {label}"] = report_b[c][key] - report_a[c][key]
        rows.append(row)
    return pd.DataFrame(rows)

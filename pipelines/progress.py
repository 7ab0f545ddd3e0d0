"""The train stage's progress while it runs, read from the files DVCLive writes after each epoch
(paths.train: params.yaml at the start, metrics.json after every epoch), for the Prefect UI: a
progress artifact and a log line per epoch."""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import yaml

# Only the stage whose DVCLive files this reads: dvc.yaml's train stage writes them to paths.train.
STAGE = "train"
ARTIFACT_KEY = "cifar10-train-progress"


@dataclass(frozen=True)
class Epoch:
    done: int
    epochs: int
    loss: float | None
    val_accuracy: float | None
    epoch_seconds: float | None

    @property
    def percent(self) -> float:
        return round(100 * self.done / max(self.epochs, 1), 1)

    def describe(self) -> str:
        parts = [f"train: epoch {self.done}/{self.epochs}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.val_accuracy is not None:
            parts.append(f"val_accuracy {self.val_accuracy:.4f}")
        if self.epoch_seconds is not None and math.isfinite(self.epoch_seconds):
            parts.append(f"about {self.epoch_seconds * (self.epochs - self.done):.0f} s left")
        return ", ".join(parts)


def _number(value: object) -> float | None:
    """A metric as DVCLive writes it: a number, or a string for one JSON cannot hold ("nan", "inf")."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def read_epoch(folder: Path, since: float) -> Epoch | None:
    """The last finished epoch of the run that started at `since` (a time.time()), None before its
    first one; files left by an earlier run (older than `since`) are not read."""
    params, metrics = folder / "params.yaml", folder / "metrics.json"
    try:
        if min(params.stat().st_mtime, metrics.stat().st_mtime) < since:
            return None
        epochs = int((yaml.safe_load(params.read_text()) or {})["epochs"])
        latest = json.loads(metrics.read_text())
        step = int(latest["step"])
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return None  # not written yet, or caught half-written: the next look reads it
    train, evaluation = latest.get("train") or {}, latest.get("eval") or {}
    return Epoch(step + 1, epochs, _number(train.get("loss")), _number(evaluation.get("accuracy")),
                 _number(train.get("epoch_seconds")))


class Watcher:
    """Reads `folder` every `every_s` seconds on a thread and calls `report` with each new epoch,
    then once more when stopped, so the last epoch is reported however short the run.

    Progress only describes the run: the first error in reading or reporting it (a Prefect API that
    stops answering, say) is one line to `warn` and the end of the updates, never a traceback in the
    run's output nor a failed run."""

    def __init__(self, folder: Path, since: float, report: Callable[[Epoch], None],
                 warn: Callable[[str], None], every_s: float = 2.0) -> None:
        self.folder, self.since, self.report, self.warn, self.every_s = folder, since, report, warn, every_s
        self.stopped = threading.Event()
        self.failed = False
        self.last_done = 0  # the number of the last epoch reported
        self.thread = threading.Thread(target=self.watch, name="train-progress", daemon=True)

    def look(self) -> None:
        if self.failed:
            return
        try:
            epoch = read_epoch(self.folder, self.since)
            # By its number: an epoch whose loss is nan never equals itself.
            if epoch is not None and epoch.done != self.last_done:
                self.last_done = epoch.done
                self.report(epoch)
        except Exception as exc:  # noqa: BLE001 - see the class: any error ends the updates, in one line
            self.failed = True
            self.warn(f"training progress stopped updating: {type(exc).__name__}: {exc}")

    def watch(self) -> None:
        while not self.failed and not self.stopped.wait(self.every_s):
            self.look()

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)
        self.look()

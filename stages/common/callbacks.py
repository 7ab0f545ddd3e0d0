"""The callbacks a training run uses, in one place: the recipe's (airbench's lookahead, the epoch
count alternating flips read, each epoch's own time) and the train stage's own (stopping cleanly
on Ctrl-C or SIGTERM between batches, the per-epoch log a resumed run keeps, a sweep's trial
hearing each epoch's validation accuracy)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras

from stages.common.errors import stop_signals_to_handle
from stages.common.layers import AlternatingFlip, all_layers
from stages.common.trial import PRUNED_AT


class EpochClock(keras.callbacks.Callback):
    """Adds each epoch's wall-clock seconds to its logs, so DVCLive's curves (train/epoch_seconds)
    and the resume history carry them: time-to-accuracy is read from a run's own record."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self.started


class Lookahead(keras.callbacks.Callback):
    """airbench's lookahead: every `every` optimizer steps the weights (BatchNorm's statistics
    included) and a slow copy of them meet at their weighted mean, the slow copy's weight rising
    from 0 to `base` with the cube of the run's progress; training ends on the slow copy. Steps are
    the optimizer's own count, so a resumed run continues the ramp where it stopped."""

    def __init__(self, total_steps: int, every: int = 5, base: float = 0.95**5):
        super().__init__()
        self.total_steps, self.every, self.base = max(total_steps, 1), every, base

    def _floats(self) -> list:
        return [v for v in self.model.weights if "float" in str(v.dtype)]

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.slow = [keras.ops.convert_to_numpy(v.value).copy() for v in self._floats()]

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step % self.every:
            return
        weight = self.base * min(step / self.total_steps, 1.0) ** 3
        for i, variable in enumerate(self._floats()):
            self.slow[i] = weight * self.slow[i] + (1 - weight) * keras.ops.convert_to_numpy(variable.value)
            variable.assign(self.slow[i])

    def on_train_end(self, logs: dict | None = None) -> None:
        for variable, slow in zip(self._floats(), self.slow):
            variable.assign(slow)


class FlipEpochs(keras.callbacks.Callback):
    """Tells the model's AlternatingFlip layers which epoch begins (a resumed run's count goes on
    from where it stopped, so its images keep alternating)."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        for layer in all_layers(self.model):
            if isinstance(layer, AlternatingFlip):
                layer.epoch.assign(epoch)


class StopOnInterrupt(keras.callbacks.Callback):
    """Ctrl-C, SIGTERM or SIGHUP stops training at the next batch with a KeyboardInterrupt (the stage exits 130).

    The signal handler only records the signal: a KeyboardInterrupt raised wherever Python happens
    to be could land in Keras/TensorFlow code that swallows it (they have bare `except:` clauses).
    Raised from here, between batches, it cannot be.
    """

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        # Signal handlers belong to the main thread; and a process started with SIGINT ignored
        # (a background job) keeps ignoring it, as Python itself does.
        if threading.current_thread() is not threading.main_thread() or \
                signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
            yield
            return
        # SIGTERM and SIGHUP (a service manager's stop, a closed terminal) are handled as Ctrl-C is.
        previous = {signum: signal.signal(signum, self._record) for signum in stop_signals_to_handle()}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        if self.interrupted:
            raise KeyboardInterrupt

    def _record(self, signum: int, frame: object) -> None:
        if self.interrupted:  # a second Ctrl-C does not wait for the batch to end
            raise KeyboardInterrupt
        self.interrupted = True

    def _stop_if_interrupted(self, *args: object, **kwargs: object) -> None:
        if self.interrupted:
            raise KeyboardInterrupt

    # Not on_epoch_end: the epoch that just finished is still backed up for a resume.
    on_train_batch_end = on_test_batch_end = on_epoch_begin = _stop_if_interrupted


class EpochLog(keras.callbacks.Callback):
    """Appends each finished epoch's metrics to a JSON-lines file, so a resumed run keeps them.

    It runs before BackupAndRestore saves the epoch; a kill between the two leaves one row too
    many, which `resume_history` drops.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class ReportToTrial(keras.callbacks.Callback):
    """After each epoch, report `monitor` to the trial at step = epochs done, and stop training
    when the pruner prunes it; `pruned_after` then holds that epoch (the trial records it too).
    After the last epoch the pruner is not asked: a point that trained to the end is finished,
    and ranked as such, even where that epoch is one of its pruner's rungs."""

    def __init__(self, trial: Any, monitor: str) -> None:
        super().__init__()
        self.trial, self.monitor = trial, monitor
        self.pruned_after: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        self.trial.report(float(value), epoch + 1)
        if epoch + 1 < self.params["epochs"] and self.trial.should_prune():
            self.pruned_after = epoch + 1
            self.trial.set_user_attr(PRUNED_AT, epoch + 1)
            self.model.stop_training = True

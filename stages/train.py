"""train: fit a model from the zoo on the prepared arrays (Keras 3, TensorFlow backend).

Outputs the model (paths.model; normalisation included) and its folder (paths.train: DVCLive's per-epoch
metrics and curves, plus run_info.json: device, time, seed and library versions).

A killed training resumes: Keras' BackupAndRestore keeps the last finished epoch under
.dvc/tmp/train-backup/<key>, outside DVC's outputs (DVC deletes those before a stage runs), keyed
by the train params and the prepared data, so a changed param never resumes another run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from stages.common import dataio
from stages.common.callbacks import EpochClock, EpochLog, ReportToTrial, StopOnInterrupt
from stages.common.errors import TrainingDiverged, run_main
from stages.common.models import check_trainable, gpu_names
from stages.common.params import load_section
from stages.common.paths import CLASSES, NORMALIZATION, RUN_INFO, split_file, stage_paths
from stages.common.provenance import cpu_info
from stages.common.recipe import compile_model, precision_policy, recipe_callbacks
from stages.common.schemas import TrainParams
from stages.common.trial import PRUNED_AT, open_trial

BACKUP_ROOT = Path(".dvc/tmp/train-backup")
HISTORY_FILE = "history.jsonl"

# tf.data's autotuner sleeps in doubling periods from 10 ms (waking 5.11, 10.23, ... 40.95, 81.91 s
# after an iterator starts), and dropping an iterator waited for its next wake-up: with Keras' fresh
# iterator per epoch, each epoch waited for it (docs/benchmarks.md, "Epochs that waited on tf.data").
# A cast and a one-hot per batch need no tuning.
UNTUNED = tf.data.Options()
UNTUNED.autotune.enabled = False


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None,
                 num_classes: int) -> tf.data.Dataset:
    """uint8 arrays in, float32 pixel batches and one-hot labels out; the model itself normalises."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), tf.one_hot(y, num_classes)))
    return ds.prefetch(2).with_options(UNTUNED)


class NanGuard(keras.callbacks.TerminateOnNaN):
    """TerminateOnNaN that remembers it fired, so early stopping is not mistaken for divergence."""

    fired = False

    def on_batch_end(self, batch: int, logs: dict | None = None) -> None:
        super().on_batch_end(batch, logs)
        self.fired = self.fired or bool(self.model.stop_training)


def train_device() -> str:
    gpus = gpu_names()
    return f"GPU ({gpus[0]})" if gpus else "CPU"


def distribution_strategy(kind: str) -> tf.distribute.Strategy:
    """mirrored: one replica per GPU, or per logical CPU device where several are configured (the
    tests split the CPU in two); none: TensorFlow's default, one device."""
    if kind != "mirrored":
        return tf.distribute.get_strategy()
    devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
    return tf.distribute.MirroredStrategy([d.name for d in devices])


def training_precision(setting: bool | str) -> str:
    """The dtype policy `train.mixed_precision` picks on this machine (measure a CPU with
    benchmarks/throughput.py --set mixed_precision=true)."""
    gpu = bool(gpu_names())
    return precision_policy(setting, gpu, cpu_info()["isa"], os.environ.get("ONEDNN_MAX_CPU_ISA"))


def resume_history(backup_dir: Path) -> list[dict[str, float]]:
    """Metrics of the epochs a previous, interrupted run finished (empty for a fresh start)."""
    metadata = backup_dir / "training_metadata.json"
    history = backup_dir / HISTORY_FILE
    if not metadata.is_file() or not history.is_file():
        return []
    done = int(json.loads(metadata.read_text())["epoch"])
    rows = [json.loads(line) for line in history.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["epoch"] < done]
    history.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def backup_key(params: TrainParams, prepared_dir: Path) -> str:
    """Changes whenever a train param or the prepared data does."""
    digest = hashlib.sha256(json.dumps(params.recorded(), sort_keys=True).encode())
    for name in (split_file("train"), split_file("val"), NORMALIZATION, CLASSES):
        with open(prepared_dir / name, "rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()[:16]


def compiled_model(params: TrainParams, num_classes: int, normalization: dict, steps_per_epoch: int,
                   train_images: np.ndarray | None = None) -> keras.Model:
    """The model as training fits it: seeded, at the configured precision, compiled."""
    return compile_model(params, num_classes, normalization, steps_per_epoch, jit_compile=params.xla,
                         train_images=train_images, precision=training_precision(params.mixed_precision))


def train(
    params: TrainParams,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    normalization: dict,
    callbacks: list[keras.callbacks.Callback] | None = None,
    backup_dir: Path | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build and fit the model (resuming from `backup_dir` if it holds an interrupted run);
    raise if the loss or weights stop being finite. Returns the history of all epochs."""
    steps = -(-len(splits["train"][1]) // params.batch_size)
    # Variables made in the scope are mirrored; fit splits each (global) batch across the replicas.
    with distribution_strategy(params.distribute).scope():
        model = compiled_model(params, len(classes), normalization, steps, splits["train"][0])
    k = len(classes)
    train_ds = make_dataset(*splits["train"], params.batch_size, shuffle_seed=params.seed, num_classes=k)
    has_val = len(splits["val"][1]) > 0
    val_ds = make_dataset(*splits["val"], params.batch_size, shuffle_seed=None, num_classes=k) if has_val else None
    nan_guard = NanGuard()
    # The clock comes first: the callbacks after it see the epoch's time in the same logs.
    guards: list[keras.callbacks.Callback] = [EpochClock(), nan_guard]
    guards += recipe_callbacks(params, monitor="val_loss" if has_val else "loss", steps_per_epoch=steps)
    previous: list[dict[str, float]] = []
    if backup_dir is not None:
        backup_dir.mkdir(parents=True, exist_ok=True)
        previous = resume_history(backup_dir)
        guards += [EpochLog(backup_dir / HISTORY_FILE),
                   keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True)]
    interrupt = StopOnInterrupt()
    with interrupt.installed():
        fit = model.fit(
            train_ds,
            validation_data=val_ds,
            epochs=params.epochs,
            shuffle=False,  # the tf.data pipeline shuffles, seeded
            callbacks=[interrupt, *guards, *(callbacks or [])],
            # A live progress bar at a terminal; one line per epoch in logs (DVC, Prefect, CI).
            verbose=1 if sys.stdout.isatty() else 2,
        )
    history = {key: [r[key] for r in previous if key in r] + [float(v) for v in values]
               for key, values in fit.history.items() if key != "learning_rate"}
    losses = history.get("loss", [])
    if nan_guard.fired or not np.all(np.isfinite(losses)):
        raise TrainingDiverged(
            f"training diverged (loss {losses[-1] if losses else 'nan'} at epoch {len(losses)}); "
            "lower train.learning_rate or change train.optimizer"
        )
    if not all(np.all(np.isfinite(w)) for w in model.get_weights()):
        raise TrainingDiverged("training ended with non-finite weights; lower train.learning_rate")
    return model, history


def trial_reporter(params: TrainParams, has_val: bool) -> ReportToTrial | None:
    """The callback reporting each epoch's validation accuracy to the sweep's trial, when this run is one."""
    trial = open_trial(params.trial) if params.trial else None
    if params.trial and trial is None:
        print(f"train: trial {params.trial} has ended; training to the end without reporting to it")
    return ReportToTrial(trial, "val_accuracy" if has_val else "accuracy") if trial else None


def main() -> None:
    paths = stage_paths("train", "prepared", "model", "out")
    prepared, model_path, out = paths["prepared"], paths["model"], paths["out"]
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback
    from dvclive.utils import standardize_metric_name

    params: TrainParams = load_section("train")
    check_trainable(params)  # before any data is loaded
    for warning in params.warnings():
        print(f"warning: {warning}")
    device = train_device()
    classes = dataio.read_json(prepared / CLASSES)
    normalization = dataio.read_json(prepared / NORMALIZATION)
    splits = {s: dataio.load_split(prepared / split_file(s)) for s in ("train", "val")}
    backup_dir = BACKUP_ROOT / backup_key(params, prepared)
    previous = resume_history(backup_dir)
    resumed = f", resuming after epoch {len(previous)}" if previous else ""
    cpu = cpu_info()
    precision = training_precision(params.mixed_precision)
    print(f"train: {params.model} on {device} ({precision}), {len(splits['train'][1]):,} images, {params.epochs} epochs{resumed}")
    if params.distribute == "mirrored" and device == "CPU":
        print("warning: train.distribute is mirrored but TensorFlow sees no GPU: one replica on the CPU")

    started = time.perf_counter()
    # dvcyaml=None: the stage's plots are declared in dvc.yaml, DVCLive must not edit it.
    with Live(str(out), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        live.log_params(params.recorded())
        for row in previous:  # the curves cover every epoch, also those before an interruption
            for name, value in row.items():
                if name != "epoch":
                    live.log_metric(standardize_metric_name(name, "dvclive.keras"), value)
            live.next_step()
        reporter = trial_reporter(params, has_val=len(splits["val"][1]) > 0)
        callbacks = [DVCLiveCallback(live=live), *([reporter] if reporter else [])]
        model, history = train(params, splits, classes, normalization, callbacks, backup_dir)
        pruned = {PRUNED_AT: reporter.pruned_after} if reporter and reporter.pruned_after else {}
        live.summary.update(pruned)  # `dvc exp show` lists where a pruned point stopped
    seconds = time.perf_counter() - started

    with dataio.atomic_path(model_path) as tmp:
        model.save(tmp)
    info: dict[str, Any] = {
        "device": device,
        "cpu": cpu,
        "precision": precision,
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / max(len(history.get("loss", [])) - len(previous), 1), 1),
        "resumed_after_epoch": len(previous),
        **pruned,
        "parameters": model.count_params(),
        "distribute": params.distribute,
        "replicas": model.distribute_strategy.num_replicas_in_sync,
        "seed": params.seed,
        "versions": {"python": platform.python_version(), "numpy": np.__version__,
                     "tensorflow": tf.__version__, "keras": keras.__version__},
    }
    dataio.write_json(out / RUN_INFO, info)
    shutil.rmtree(backup_dir, ignore_errors=True)
    final = {k: round(v[-1], 4) for k, v in history.items()}
    if pruned:
        print(f"train: trial {params.trial} pruned by its sweep's pruner after epoch {pruned[PRUNED_AT]} of {params.epochs}")
    print(f"train: done in {seconds:.1f} s on {device}; last epoch {final} -> {model_path}")


if __name__ == "__main__":
    run_main(main)

"""train: fit a model from the zoo on the prepared arrays (Keras 3, TensorFlow backend).

Outputs `models/model.keras` (normalisation included) and results/train/ (DVCLive's per-epoch
metrics and curves, plus run_info.json saying which device trained and how long it took).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from stages.common import dataio  # noqa: E402
from stages.common.errors import TrainingDiverged, run_main  # noqa: E402
from stages.common.models import MODELS, build_model  # noqa: E402
from stages.common.params import knob, load_section  # noqa: E402

PREPARED_DIR = Path("data/prepared")
MODEL_PATH = Path("models/model.keras")
OUT_DIR = Path("results/train")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")


@dataclass(frozen=True)
class TrainParams:
    model: str = knob(choices=tuple(MODELS))
    epochs: int = knob(min=1, max=10_000)
    batch_size: int = knob(min=1, max=65_536)
    optimizer: str = knob(choices=OPTIMIZERS)
    learning_rate: float = knob(min=0.0, max=10.0, min_exclusive=True)
    seed: int = knob(min=0)


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle_seed: int | None) -> tf.data.Dataset:
    """uint8 arrays in, float32 pixel batches out; the model itself normalises."""
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle_seed is not None:
        ds = ds.shuffle(len(images), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    return {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True),
        "rmsprop": keras.optimizers.RMSprop,
    }[name](learning_rate=learning_rate)


def train_device() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU ({gpus[0].name})" if gpus else "CPU"


def train(
    params: TrainParams,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    classes: list[str],
    normalization: dict,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build and fit the model; raise if the loss or weights stop being finite."""
    keras.utils.set_random_seed(params.seed)
    model = build_model(params.model, len(classes), normalization["mean"], normalization["std"])
    model.compile(
        optimizer=make_optimizer(params.optimizer, params.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    train_ds = make_dataset(*splits["train"], params.batch_size, shuffle_seed=params.seed)
    val_ds = make_dataset(*splits["val"], params.batch_size, shuffle_seed=None) if len(splits["val"][1]) else None
    history = model.fit(
        train_ds,
        validation_data=val_ds,
        epochs=params.epochs,
        shuffle=False,  # the tf.data pipeline shuffles, seeded
        callbacks=[keras.callbacks.TerminateOnNaN(), *(callbacks or [])],
        verbose=2,
    )
    losses = history.history.get("loss", [])
    if len(losses) < params.epochs or not np.all(np.isfinite(losses)):
        raise TrainingDiverged(
            f"training diverged (loss {losses[-1] if losses else 'nan'} at epoch {len(losses)}); "
            "lower train.learning_rate or change train.optimizer"
        )
    if not all(np.all(np.isfinite(w)) for w in model.get_weights()):
        raise TrainingDiverged("training ended with non-finite weights; lower train.learning_rate")
    return model, history.history


def main() -> None:
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    params = load_section("train", TrainParams)
    classes = dataio.read_json(PREPARED_DIR / "classes.json")
    normalization = dataio.read_json(PREPARED_DIR / "normalization.json")
    splits = {s: dataio.load_split(PREPARED_DIR / f"{s}.npz") for s in ("train", "val")}
    device = train_device()
    print(f"train: {params.model} on {device}, {len(splits['train'][1]):,} images, {params.epochs} epochs")

    started = time.perf_counter()
    # dvcyaml=None: the stage's plots are declared in dvc.yaml, DVCLive must not edit it.
    with Live(str(OUT_DIR), dvcyaml=None, save_dvc_exp=False, report=None) as live:
        live.log_params(asdict(params))
        model, history = train(params, splits, classes, normalization, [DVCLiveCallback(live=live)])
    seconds = time.perf_counter() - started

    with dataio.atomic_path(MODEL_PATH) as tmp:
        model.save(tmp)
    info: dict[str, Any] = {
        "device": device,
        "seconds": round(seconds, 1),
        "seconds_per_epoch": round(seconds / params.epochs, 1),
        "parameters": model.count_params(),
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
    }
    dataio.write_json(OUT_DIR / "run_info.json", info)
    final = {k: round(v[-1], 4) for k, v in history.items()}
    print(f"train: done in {seconds:.1f} s on {device}; last epoch {final} -> {MODEL_PATH}")


if __name__ == "__main__":
    run_main(main)

"""Train a preset on a CIFAR-10 class-folder archive with plain Keras, on whatever backend and
device Keras has (JAX on a GPU machine without TensorFlow), and report time-to-accuracy.

The recipe is the train stage's own (stages/common/recipe.py: params, model, schedule, optimizer,
callbacks); the split and normalisation are prepare's (stages/prepare.py). On TensorFlow the input
path is the train stage's too (stages.train.make_dataset); elsewhere NumPy arrays go into
`model.fit`, since tf.data is not there. Each epoch's record is written to --out as it finishes, so
a run cut short still reports what it reached.

    KERAS_BACKEND=jax python benchmarks/gpu_recipe.py --archive cifar10-jpeg.tar.gz --preset gpu-fast
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("KERAS_BACKEND", "jax")  # the GPU machine has JAX, not TensorFlow

import keras

from stages.common import dataio
from stages.common.callbacks import EpochClock
from stages.common.inference import predict_probabilities
from stages.common.params import parse_assignments, parse_section
from stages.common.provenance import cpu_info
from stages.common.recipe import compile_model, precision_policy, recipe_callbacks
from stages.common.run_params import effective_params
from stages.common.schemas import EvaluateParams, PrepareParams, TrainParams
from stages.prepare import decode_image, fit_normalization, stratified_split

REPO = Path(__file__).resolve().parents[1]


def load_archive(archive: Path) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """{'train'|'test': (uint8 images, labels)} and the class names (sorted folder names)."""
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    names: dict[str, list[str]] = {"train": [], "test": []}
    for name, content in dataio.iter_members(archive, dataio.container_of(archive)):
        entry = dataio.class_folder_entry(name)
        if entry:
            images[entry[0]].append(decode_image(content, name, convert=False))
            names[entry[0]].append(entry[1])
    classes = sorted(set(names["train"]))
    index = {c: i for i, c in enumerate(classes)}
    return {s: (np.stack(images[s]), np.asarray([index[c] for c in names[s]])) for s in images}, classes


def recipe(preset: str, sets: list[str]) -> tuple[TrainParams, PrepareParams, EvaluateParams]:
    """params.yaml with the preset and --set overrides on top, checked by the stages' schemas."""
    params = effective_params(REPO / "params.yaml", preset, parse_assignments(sets))
    return (parse_section(params["train"], TrainParams, "train"),
            parse_section(params["prepare"], PrepareParams, "prepare"),
            parse_section(params["evaluate"], EvaluateParams, "evaluate"))


class Record(keras.callbacks.Callback):
    """Each epoch's validation accuracy and seconds, written out as soon as the epoch ends."""

    def __init__(self, out: Path, header: dict) -> None:
        super().__init__()
        self.out, self.header, self.epochs = out, header, []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        self.epochs.append({"epoch": epoch + 1, "seconds": round(float(logs.get("epoch_seconds", 0.0)), 2),
                            "val_accuracy": round(float(logs.get("val_accuracy", float("nan"))), 4),
                            "accuracy": round(float(logs.get("accuracy", float("nan"))), 4)})
        self.write()

    def write(self, **extra: object) -> None:
        self.header.update(extra)
        self.out.write_text(json.dumps({**self.header, "epochs": self.epochs}, indent=1) + "\n")


def first_reaching(epochs: list[dict], target: float) -> tuple[int, float] | None:
    """(epoch, cumulative training seconds) when validation accuracy first reached `target`."""
    total = 0.0
    for row in epochs:
        total += row["seconds"]
        if row["val_accuracy"] >= target:
            return row["epoch"], round(total, 2)
    return None


@dataclass
class Data:
    """The archive split and normalised as prepare does it, held in memory for any number of fits."""

    x: np.ndarray
    y: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    normalization: dict
    test: tuple[np.ndarray, np.ndarray]
    classes: list[str]
    load_seconds: float


def load_data(archive: Path, prepare_params: PrepareParams) -> Data:
    started = time.perf_counter()
    source, classes = load_archive(archive)
    train_idx, val_idx = stratified_split(source["train"][1], prepare_params.val_fraction,
                                          prepare_params.train_limit_per_class, prepare_params.seed)
    x, y = source["train"]
    norm = fit_normalization(x[train_idx], prepare_params.normalization)
    return Data(x, y, train_idx, val_idx, norm, source["test"], classes, round(time.perf_counter() - started, 1))


def pick_policy(train_params: TrainParams) -> tuple[str, list[str]]:
    """The dtype policy `train.mixed_precision` picks on this device, and Keras' devices."""
    devices = [str(d) for d in keras.distribution.list_devices()]
    gpu = any("gpu" in d.lower() or "cuda" in d.lower() for d in devices)
    return precision_policy(train_params.mixed_precision, gpu, cpu_info()["isa"]), devices


def fit_inputs(data: Data, train_x: np.ndarray, batch_size: int, seed: int) -> dict:
    """`model.fit`'s inputs (`train_x`: the training images, already gathered): where TensorFlow
    is, the train stage's tf.data pipeline (Keras' own for arrays waits on the autotuner each epoch:
    stages.train.UNTUNED); elsewhere the arrays."""
    k = len(data.classes)
    if keras.backend.backend() == "tensorflow":
        from stages.train import make_dataset

        return {"x": make_dataset(train_x, data.y[data.train_idx], batch_size, seed, k),
                "shuffle": False,  # the pipeline shuffles, seeded
                "validation_data": make_dataset(data.x[data.val_idx], data.y[data.val_idx], batch_size, None, k)}
    onehot = np.eye(k, dtype=np.float32)
    return {"x": train_x.astype(np.float32), "y": onehot[data.y[data.train_idx]],
            "batch_size": batch_size, "shuffle": True,
            "validation_data": (data.x[data.val_idx].astype(np.float32), onehot[data.y[data.val_idx]])}


def fit_recipe(train_params: TrainParams, data: Data, record: Record, jit_compile: bool | str,
               precision: str) -> tuple[keras.Model, float]:
    """The recipe's model, fitted on the training split and watched on the validation split;
    returns it and the seconds `fit` took."""
    k = len(data.classes)
    train_x = data.x[data.train_idx]
    steps = -(-len(train_x) // train_params.batch_size)
    model = compile_model(train_params, k, data.normalization, steps, jit_compile=jit_compile, train_images=train_x,
                          precision=precision)
    inputs = fit_inputs(data, train_x, train_params.batch_size, train_params.seed)
    started = time.perf_counter()
    model.fit(**inputs, epochs=train_params.epochs, verbose=2,
              callbacks=[EpochClock(), *recipe_callbacks(train_params, "val_loss", steps), record])
    return model, time.perf_counter() - started


def accuracy_on_test(model: keras.Model, data: Data, tta_flip: bool, tta_translate: int) -> float:
    probabilities = predict_probabilities(model, data.test[0], 1024, tta_flip, tta_translate)
    return round(float((probabilities.argmax(axis=1) == data.test[1]).mean()), 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, required=True, help="class-folder archive (the offline mirror)")
    parser.add_argument("--preset", default="gpu-fast")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE over the preset")
    parser.add_argument("--targets", type=float, nargs="*", default=[0.85, 0.88, 0.90, 0.93, 0.94])
    parser.add_argument("--out", type=Path, default=Path("gpu_recipe.json"))
    args = parser.parse_args()

    train_params, prepare_params, evaluate_params = recipe(args.preset, args.sets)
    data = load_data(args.archive, prepare_params)
    policy, devices = pick_policy(train_params)
    header = {"preset": args.preset, "sets": args.sets, "backend": keras.backend.backend(), "devices": devices,
              "policy": policy, "keras": keras.__version__, "train_images": len(data.train_idx),
              "val_images": len(data.val_idx), "load_seconds": data.load_seconds}
    print(json.dumps(header), flush=True)

    record = Record(args.out, header)
    model, fit_s = fit_recipe(train_params, data, record, jit_compile=True, precision=policy)
    tta = {"tta_flip": evaluate_params.tta_flip, "tta_translate": evaluate_params.tta_translate}
    accuracy = accuracy_on_test(model, data, **tta)
    reached = {str(t): first_reaching(record.epochs, t) for t in args.targets}
    record.write(test_accuracy=accuracy, **tta, fit_seconds=round(fit_s, 1),
                 epoch_seconds_total=round(sum(e["seconds"] for e in record.epochs), 2), reached=reached)
    print(f"{args.preset}: test accuracy {accuracy:.4f} (TTA {tta}) after {len(record.epochs)} epochs, "
          f"{fit_s:.1f} s in fit on {devices[0]}; first epoch (with compilation) {record.epochs[0]['seconds']} s")
    for target, hit in reached.items():
        print(f"  val {target}: " + (f"epoch {hit[0]}, {hit[1]} s" if hit else "not reached"))


if __name__ == "__main__":
    main()

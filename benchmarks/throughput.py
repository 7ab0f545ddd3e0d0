"""Training throughput (images/s) of the train stage's input pipeline against a bare model.fit.

Both fit the same model, batch size and images: one warm-up epoch each, then `--repeats` timed
epochs taken in turns; the fastest of each is reported, with the median and range. The pipeline
path is `stages.train.make_dataset` (tf.data from uint8, one-hot, shuffled), the bare path is
`model.fit` on in-memory float32 arrays. The model, batch size and augmentation come from
params.yaml (or a preset), so the numbers describe what `dvc repro` would train.

    python benchmarks/throughput.py                      # params.yaml's train section
    python benchmarks/throughput.py --preset seed001 --images 10000
    python benchmarks/throughput.py --set mixed_precision=true --set xla=true
    python benchmarks/throughput.py --versus mixed_precision=false   # the pipeline against itself in float32
    python benchmarks/throughput.py --preset first-default --versus-preset default --images 10240

With --versus, the bare side is replaced by the same pipeline with those keys changed, so two
settings are timed in turns in one process (on a machine whose speed drifts, the fair comparison).
With --versus-preset, the other side is that preset's train section (under the same --set).
With --alone, only the pipeline is timed (comparisons across processes: benchmarks/threads.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

from stages.common.callbacks import EpochClock
from stages.common.errors import ConfigError, run_main
from stages.common.params import parse_assignments, parse_section
from stages.common.run_params import effective_params
from stages.common.schemas import TrainParams
from stages.train import compiled_model, make_dataset

NORMALIZATION = {"mean": [125.0, 123.0, 114.0], "std": [63.0, 62.0, 66.0]}  # CIFAR-10's, roughly


def train_params(preset: str | None, overrides: list[str]) -> TrainParams:
    """params.yaml's train section with the preset and KEY=VALUE overrides of train's keys on top."""
    pairs = parse_assignments(overrides, "--set/--versus", example="mixed_precision=true")
    sets = {f"train.{key}": value for key, value in pairs.items()}
    return parse_section(effective_params(Path("params.yaml"), preset, sets)["train"], TrainParams, "train")


Fit = Callable[[list[keras.callbacks.Callback]], keras.callbacks.History]


def timed_epochs(fits: dict[str, Fit], repeats: int) -> dict[str, list[float]]:
    """Seconds per epoch of each fit, `repeats` times after a warm-up (tracing, compilation).

    The fits take turns, so a slow spell of a shared machine hits both sides rather than one.
    The epoch itself is timed (EpochClock), not the fit call, whose set-up and tear-down a training
    run pays once: fit waited there for tf.data's autotuner (as Keras' own pipeline for arrays, the
    bare side's, still does; stages.train.UNTUNED), and epochs of 8 s and 17 s came out at 10.2 s
    and 20.5 s (2-core EPYC, 2026-11-30).
    """
    for fit in fits.values():
        fit([])
    seconds: dict[str, list[float]] = {name: [] for name in fits}
    for _ in range(repeats):
        for name, fit in fits.items():
            seconds[name].append(fit([EpochClock()]).history["epoch_seconds"][-1])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per side (the median is reported)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a train.* key, e.g. mixed_precision=true")
    parser.add_argument("--versus", action="append", default=[], metavar="KEY=VALUE",
                        help="time the pipeline against itself with this train.* key changed, instead of a bare fit")
    parser.add_argument("--versus-preset", metavar="NAME",
                        help="time the pipeline against this preset's training, instead of a bare fit")
    parser.add_argument("--alone", action="store_true",
                        help="time only the pipeline, no second side (for comparisons across processes)")
    args = parser.parse_args()
    if args.alone and (args.versus or args.versus_preset):
        raise ConfigError("--alone times one side only; drop --versus/--versus-preset, or --alone")
    params = train_params(args.preset, args.set)
    other = None
    if args.versus or args.versus_preset:
        other = train_params(args.versus_preset or args.preset, [*args.set, *args.versus])
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.images)
    steps = -(-args.images // params.batch_size)

    model = compiled_model(params, 10, NORMALIZATION, steps)
    ds = make_dataset(images, labels, params.batch_size, shuffle_seed=0, num_classes=10)
    fits: dict[str, Fit] = {"pipeline": lambda cbs: model.fit(ds, epochs=1, verbose=0, shuffle=False, callbacks=cbs)}
    if other:
        versus = compiled_model(other, 10, NORMALIZATION, -(-args.images // other.batch_size))
        other_ds = make_dataset(images, labels, other.batch_size, shuffle_seed=0, num_classes=10)
        fits["versus"] = lambda cbs: versus.fit(other_ds, epochs=1, verbose=0, shuffle=False, callbacks=cbs)
    elif not args.alone:
        bare = compiled_model(params, 10, NORMALIZATION, steps)
        x, y = images.astype(np.float32), np.eye(10, dtype=np.float32)[labels]
        fits["bare_fit"] = lambda cbs: bare.fit(x, y, batch_size=params.batch_size, epochs=1, verbose=0,
                                               callbacks=cbs)
    seconds = timed_epochs(fits, args.repeats)
    # The fastest epoch is the one least disturbed by the rest of a shared machine (as timeit
    # takes the minimum); medians and ranges show how disturbed the others were.
    best = {name: min(values) for name, values in seconds.items()}
    result = {
        "model": params.model, "arch": params.arch, "batch_size": params.batch_size, "images": args.images,
        "mixed_precision": params.mixed_precision, "xla": params.xla, "ema": params.ema,
        "parameters": model.count_params(), "repeats": args.repeats,
        **{f"{name}_images_per_s": round(args.images / s, 1) for name, s in best.items()},
        **{f"{name}_median": round(args.images / statistics.median(v), 1) for name, v in seconds.items()},
        **{f"{name}_range": [round(args.images / max(v), 1), round(args.images / min(v), 1)]
           for name, v in seconds.items()},
    }
    if other:
        result["versus"] = args.versus_preset or args.versus
        result["versus_model"] = {"model": other.model, "arch": other.arch, "batch_size": other.batch_size,
                                  "mixed_precision": other.mixed_precision, "parameters": versus.count_params()}
        result["pipeline_over_versus_median"] = round(
            statistics.median(seconds["versus"]) / statistics.median(seconds["pipeline"]), 3)
    elif not args.alone:
        result["pipeline_over_bare"] = round(best["bare_fit"] / best["pipeline"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    run_main(main)

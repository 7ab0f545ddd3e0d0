"""What restarts cost a run: the same learning rates and seeds trained with one one-cycle and with
`train.restarts` (a pruner's rungs), as one grid sweep on a slice of a class-folder archive (the
CIFAR-10 mirror), one point at a time. Per pair, the test accuracy both ways and the difference.

    python benchmarks/restarts_cost.py --source ../shared/data/cifar10-jpeg.tar.gz --sha256 HASH \\
        [--train-per-class 500] [--test-per-class 100] [--epochs 9] [--learning-rates 1.41 0.83] \\
        [--seeds 42 43] [--restarts 1 3] --out RAW.json

The other knobs are the default recipe's (weight decay, label smoothing), at `--batch-size`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's project set-up is reused; tests/ is not installed

from benchmarks.sweep_pruning import search
from benchmarks.sweep_setup import add_mirror_arguments, bench_env, mirror_baseline


def pairs(table: list[dict], restarts: list[int]) -> list[dict]:
    """Each (learning rate, seed) with its test accuracy under one cycle and under `restarts`."""
    by_point: dict[tuple[float, int], dict] = {}
    for row in table:
        cycles = "restarts" if json.loads(str(row["train.restarts"])) == restarts else "one_cycle"
        by_point.setdefault((row["train.learning_rate"], row["train.seed"]), {})[cycles] = row["accuracy"]
    return [{"learning_rate": lr, "seed": seed, **found,
             "difference_points": round(100 * (found["restarts"] - found["one_cycle"]), 1)}
            for (lr, seed), found in sorted(by_point.items()) if {"restarts", "one_cycle"} <= found.keys()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mirror_arguments(parser, epochs=9, train_per_class=500)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1.41, 0.83])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    parser.add_argument("--restarts", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = bench_env()
    with mirror_baseline(args, env, "restarts-cost-") as (repo, figures):
        grid = {"kind": "grid", "space": {"train.learning_rate": args.learning_rates, "train.seed": args.seeds,
                                          "train.restarts": [[], args.restarts]}}
        figures["sweep"] = search(repo, "r", grid, env)
        figures["pairs"] = pairs(figures["sweep"]["table"], args.restarts)
        differences = [pair["difference_points"] for pair in figures["pairs"]]
        figures["mean_difference_points"] = round(statistics.mean(differences), 2) if differences else None
        args.out.write_text(json.dumps(figures, indent=1))
        for pair in figures["pairs"]:
            print(pair)
        print("mean difference, restarts less one cycle (points):", figures["mean_difference_points"])


if __name__ == "__main__":
    main()

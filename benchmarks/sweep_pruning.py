"""The same random search with and without a pruner, one after the other: wall time, best test
accuracy, trials pruned, and what one point costs (its stages' seconds against the sweep's wall
time per point: the rest is the per-point overhead of DVC's queue and the stages' start-up).

Builds a project on a slice of a class-folder archive (the CIFAR-10 mirror), runs and commits its
baseline once (every point shares its download, prepare and validate), then runs
`cifar10-pipeline sweep` on the space twice, `--name plain` and `--name pruned` (the same points:
same kind, n and seed; the second with `pruner:`), one point at a time, on a temporary Prefect API.
The unpruned search's validation curves are kept with Optuna's other pruners replayed on them
(benchmarks/pruner_replay.py), so one run tells what each would have done.

    python benchmarks/sweep_pruning.py --source ../shared/data/cifar10-jpeg.tar.gz --sha256 HASH \\
        [--train-per-class 300] [--test-per-class 100] [--n 16] [--epochs 9] [--restarts 1 3] --out RAW.json

`--restarts` sets the baseline's `train.restarts` (both searches train so): at the pruner's rungs
(epochs 1 and 3 for successive halving from epoch 1 by thirds), each decision sees an annealed model.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's project set-up is reused; tests/ is not installed

from benchmarks.pruner_replay import replay_all
from benchmarks.sweep_setup import SPACE, add_mirror_arguments, bench_env, mirror_baseline
from stages.common.paths import RUN_INFO, artifact_paths
from tests.helpers import BIN

PRUNER = {"successive_halving": {"min_resource": 1, "reduction_factor": 3}}


def point_records(repo: Path, names: list[str]) -> dict[str, dict[str, float]]:
    """Each point's epochs run and training seconds, from its experiment's commit."""
    train_dir = artifact_paths(repo)["train"]
    shown = json.loads(subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=repo, capture_output=True,
                                      text=True, check=True).stdout)
    out = {}
    for base in shown:
        for exp in base.get("experiments") or []:
            if exp.get("name") in names:
                rev = exp["revs"][0]["rev"]
                info = json.loads(subprocess.run(["git", "show", f"{rev}:{train_dir.as_posix()}/{RUN_INFO}"], cwd=repo,
                                                 capture_output=True, text=True, check=True).stdout)
                train = ((exp["revs"][0]["data"].get("metrics") or {}).get(f"{train_dir.as_posix()}/metrics.json") or {})
                out[exp["name"]] = {"epochs_run": (train.get("data") or {}).get("step", -1) + 1,
                                    "train_s": info["seconds"]}
    return out


def random_search(args: argparse.Namespace, pruner: dict | None) -> dict:
    """The benchmark's sweep file: a random search over SPACE, with `pruner` when given."""
    return {"kind": "random", "n": args.n, "seed": args.seed, "space": SPACE, **({"pruner": pruner} if pruner else {})}


def search(repo: Path, name: str, sweep_file: dict, env: dict[str, str]) -> dict:
    """`cifar10-pipeline sweep` on `sweep_file` (its content) as `name`: wall time, points, pruned,
    failed, best, epochs and training seconds, the rest per point, and the table."""
    path = repo.parent / f"{name}.yaml"
    path.write_text(yaml.safe_dump(sweep_file))
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "cifar10-pipeline"), "sweep", str(path), "--name", name, "--repo", str(repo)],
                          env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 1) or not (repo / "comparisons" / f"{name}.csv").exists():  # 1: a point failed
        raise SystemExit(f"sweep {name} failed: {done.stderr[-3000:]}")
    table = pd.read_csv(repo / "comparisons" / f"{name}.csv")
    finished = table[table["status"] == "ok"]
    points = point_records(repo, list(table["name"]))
    train_s = sum(p["train_s"] for p in points.values())
    return {"wall_s": round(seconds, 1), "points": len(table), "pruned": int((table["status"] == "pruned").sum()),
            "failed": int((table["status"] == "failed").sum()),
            "best": finished.iloc[0]["name"] if len(finished) else None,
            "best_accuracy": float(finished.iloc[0]["accuracy"]) if len(finished) else None,
            "epochs_run": sum(p["epochs_run"] for p in points.values()), "train_s": round(train_s, 1),
            # Everything but training, per point: DVC's queue, each stage's start-up, evaluate, the study.
            "overhead_s_per_point": round((seconds - train_s) / max(len(table), 1), 1),
            "table": table.astype(object).where(table.notna(), None).to_dict("records")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mirror_arguments(parser, epochs=9)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--restarts", type=int, nargs="*", default=[], help="train.restarts: epochs (default: none)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = bench_env()
    with mirror_baseline(args, env, "sweep-pruning-", restarts=args.restarts) as (repo, figures):
        figures.update(space=SPACE, pruner=PRUNER)
        figures["plain"] = search(repo, "plain", random_search(args, None), env)
        try:
            figures["replay"] = replay_all(repo, "plain")
        except SystemExit as err:  # a point failed: there is no whole search to replay
            figures["replay"] = {"skipped": str(err)}
        args.out.write_text(json.dumps(figures, indent=1))  # the unpruned half survives a failed second
        figures["pruned"] = search(repo, "pruned", random_search(args, PRUNER), env)
        plain, pruned = figures["plain"], figures["pruned"]
        figures["speedup"] = round(plain["wall_s"] / pruned["wall_s"], 2)
        if plain["best_accuracy"] is not None and pruned["best_accuracy"] is not None:
            figures["best_accuracy_gap_points"] = round(100 * (plain["best_accuracy"] - pruned["best_accuracy"]), 2)
        args.out.write_text(json.dumps(figures, indent=1))
        print(json.dumps({k: v for k, v in figures.items() if k not in ("plain", "pruned")}, indent=1))
        for name in ("plain", "pruned"):
            print(name, {k: v for k, v in figures[name].items() if k != "table"})


if __name__ == "__main__":
    main()

"""What Optuna's pruners would have done to a finished, unpruned sweep: its points' recorded
validation-accuracy curves replayed in trial order, one point at a time, each pruner deciding after
every epoch as the train stage asks it to. Per pruner: epochs trained, points pruned, and the best
test accuracy among the points it let finish, against the whole search's.

A replay, not a timed run: it tells which pruners a recipe's curves allow (the one-cycle warm-up
can hold a point that ends best at chance accuracy for epochs), before paying for a pruned search.

    python benchmarks/pruner_replay.py --repo PROJECT --sweep NAME --out RAW.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import optuna
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.sweep_page import curves
from stages.common.trial import pruner_of

PRUNERS: dict[str, dict[str, dict[str, Any]]] = {  # as a sweep file's `pruner:` names them
    "successive halving, from epoch 1": {"successive_halving": {"min_resource": 1, "reduction_factor": 3}},
    "successive halving, from epoch 3": {"successive_halving": {"min_resource": 3, "reduction_factor": 3}},
    "successive halving, from epoch 5": {"successive_halving": {"min_resource": 5, "reduction_factor": 3}},
    "hyperband": {"hyperband": {"min_resource": 1, "reduction_factor": 3}},
    "median, after epoch 3": {"median": {"n_startup_trials": 3, "n_warmup_steps": 3}},
    "median, after epoch 5": {"median": {"n_startup_trials": 3, "n_warmup_steps": 5}},
    "median, after epoch 7": {"median": {"n_startup_trials": 3, "n_warmup_steps": 7}},
}


def replay(points: list[dict[str, Any]], spec: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """The sweep's decisions under the pruner `spec` (a sweep file's; None: none), for `points`
    (name, validation curve, test accuracy) in trial order."""
    epochs = len(points[0]["val"])
    study = optuna.create_study(direction="maximize", pruner=pruner_of(spec) if spec else optuna.pruners.NopPruner())
    trained, pruned, finished = 0, [], []
    for point in points:
        trial = study.ask()
        for step, value in enumerate(point["val"], 1):
            trial.report(value, step)
            trained += 1
            if step < epochs and trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                pruned.append(point["name"])
                break
        else:
            study.tell(trial, point["test"])
            finished.append(point)
    best = max(finished, key=lambda point: point["test"])
    return {"epochs": trained, "pruned": len(pruned), "best": best["name"], "best_accuracy": best["test"]}


def replay_all(repo: Path, sweep: str) -> dict[str, Any]:
    """Every pruner in PRUNERS replayed on the finished, unpruned sweep `sweep` in `repo`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = pd.read_csv(repo / "comparisons" / f"{sweep}.csv")
    if set(table["status"]) != {"ok"}:
        raise SystemExit(f"sweep {sweep} has pruned or failed points: replay a search that ran every point to the end")
    order = sorted(table["name"], key=lambda name: int(name.rsplit("-", 1)[1]))  # trial order
    per_point = curves(repo, order)
    tests = dict(zip(table["name"], table["accuracy"]))
    points = [{"name": name, "val": per_point[name], "test": float(tests[name])} for name in order]
    whole = replay(points, None)
    results = {label: replay(points, spec) for label, spec in PRUNERS.items()}
    for found in results.values():
        found["epochs_share"] = round(found["epochs"] / whole["epochs"], 3)
        found["gap_points"] = round(100 * (whole["best_accuracy"] - found["best_accuracy"]), 2)
    return {"sweep": sweep, "points": points, "unpruned": whole, "pruners": PRUNERS, "replayed": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--sweep", required=True, help="its name: comparisons/NAME.csv lists its points")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    figures = replay_all(args.repo, args.sweep)
    args.out.write_text(json.dumps(figures, indent=1))
    print(f"unpruned: {figures['unpruned']}")
    for label, found in figures["replayed"].items():
        print(f"{label:34s} {found}")


if __name__ == "__main__":
    main()

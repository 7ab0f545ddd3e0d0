"""Time-to-accuracy of a finished run, read from the pipeline's own record of it.

The train stage logs each epoch's validation accuracy and wall-clock seconds (DVCLive curves in
its output folder); evaluate writes the test accuracy. This prints, as Markdown, the
training seconds at which validation accuracy first reached each target, the per-epoch curve,
and the final test accuracy against the target the default recipe is held to.

    dvc repro && python benchmarks/time_to_accuracy.py        # the workspace's run
    dvc exp apply NAME && python benchmarks/time_to_accuracy.py --targets 0.8 0.85
"""

from __future__ import annotations

import argparse
import json
from itertools import accumulate
from pathlib import Path

import pandas as pd

from stages.common.errors import DataError, run_main
from stages.common.params import read_params
from stages.common.paths import CURVES, RUN_INFO, artifact_paths, evaluation_files


def time_to_accuracy(val_accuracy: list[float], epoch_seconds: list[float],
                     targets: list[float]) -> dict[float, tuple[int, float] | None]:
    """{target: (first epoch, 1-based, whose validation accuracy >= target, training seconds up
    to the end of it)}, None for a target never reached."""
    elapsed = list(accumulate(epoch_seconds))
    reached: dict[float, tuple[int, float] | None] = {}
    for target in targets:
        epoch = next((i for i, acc in enumerate(val_accuracy) if acc >= target), None)
        reached[target] = None if epoch is None else (epoch + 1, elapsed[epoch])
    return reached


def read_curve(repo: Path, name: str) -> list[float]:
    path = repo / artifact_paths(repo)["train"] / CURVES / f"{name}.tsv"
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro` (a train stage from before epoch times "
                         "were logged has no train/epoch_seconds: rerun it with `dvc repro -f train`)")
    return pd.read_csv(path, sep="\t")[path.stem].tolist()


def render(repo: Path, targets: list[float], test_target: float, minutes: float) -> str:
    val = read_curve(repo, "eval/accuracy")
    seconds = read_curve(repo, "train/epoch_seconds")
    if len(val) != len(seconds):
        raise DataError(f"{len(val)} validation accuracies but {len(seconds)} epoch times in {repo / artifact_paths(repo)['train'] / CURVES}; "
                         "rerun training with `dvc repro -f train`")
    train = read_params(repo / "params.yaml")["train"]
    test = json.loads((repo / evaluation_files(repo)["metrics"]).read_text())["accuracy"]
    total = sum(seconds)
    run_info = repo / artifact_paths(repo)["train"] / RUN_INFO
    info = json.loads(run_info.read_text()) if run_info.is_file() else {}
    met = test >= test_target and total <= minutes * 60
    lines = [
        (f"{train['model']} {json.dumps(train.get('arch') or {})}, {len(val)} epochs, batch {train['batch_size']}, "
        f"on {info.get('device', 'unknown device')}"),
        "",
        (f"test accuracy **{test:.4f}** after **{total:.1f} s** ({total / 60:.1f} min) of training: "
        f"{'meets' if met else 'misses'} the target of {test_target} within {minutes:g} min"),
        "",
        "| validation accuracy | first epoch | training seconds |",
        "|---:|---:|---:|",
    ]
    for target, hit in time_to_accuracy(val, seconds, targets).items():
        lines.append(f"| {target} | " + (f"{hit[0]} | {hit[1]:.1f} |" if hit else "not reached | |"))
    lines += ["", "| epoch | seconds | elapsed | validation accuracy |", "|---:|---:|---:|---:|"]
    for epoch, (s, elapsed, acc) in enumerate(zip(seconds, accumulate(seconds), val), start=1):
        lines.append(f"| {epoch} | {s:.1f} | {elapsed:.1f} | {acc:.4f} |")
    return "\n".join(lines)


def _require(path: Path, repo: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro` in {repo} first")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="project whose last run to read")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.8, 0.85, 0.86, 0.9])
    parser.add_argument("--test-target", type=float, default=0.86)
    parser.add_argument("--minutes", type=float, default=20.0)
    args = parser.parse_args(argv)
    for name in ("dvc.yaml", "params.yaml"):  # dvc.yaml first: it says where the metrics are
        _require(args.repo / name, args.repo)
    _require(args.repo / evaluation_files(args.repo)["metrics"], args.repo)
    print(render(args.repo, args.targets, args.test_target, args.minutes))


if __name__ == "__main__":
    run_main(main)

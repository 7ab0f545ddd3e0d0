"""What one sweep point costs beside its training: each point's wall time (from the end of the one
before, points running one at a time), its training seconds (run_info.json) and the rest, which is the per-point overhead:
DVC's queue (a temporary workspace per point), each stage's process and imports, evaluate, and
whatever stages after it the point runs.

On a generated dataset (the test suite's), so the figures are the overhead and not the data:

    python benchmarks/sweep_point_cost.py [--points 4] [--epochs 1] --out RAW.json

To measure another revision's sweep, run this file from a worktree of it (`git worktree add`) with
PYTHONPATH pointing there: the project copied, the CLI and the stages are then that revision's.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's project set-up is reused; tests/ is not installed

from benchmarks.sweep_setup import bench_env, committed_baseline
from stages.common.paths import RUN_INFO, artifact_paths
from tests import synthetic
from tests.helpers import BIN, TINY_TEST, TINY_TRAIN, tiny_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = bench_env()
    root = Path(tempfile.mkdtemp(prefix="sweep-point-cost-"))
    try:
        archive = synthetic.write_tar_gz(root / "tiny.tar.gz", synthetic.class_folder_files(TINY_TRAIN, TINY_TEST))
        repo = committed_baseline(root / "project", env, **tiny_params(archive))
        rates = [round(0.001 * (1 + i), 4) for i in range(args.points)]
        space = root / "space.yaml"
        space.write_text(f"kind: grid\nspace:\n  train.learning_rate: {rates}\n  train.epochs: [{args.epochs}]\n")
        started, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([str(BIN / "cifar10-pipeline"), "sweep", str(space), "--name", "c", "--repo", str(repo)],
                              env=env, capture_output=True, text=True)
        wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_CHILDREN)
        # The sweep's own CPU and that of the commands it waits for (dvc queue status, exp show, git);
        # not the points': DVC's queue worker runs them, detached from the sweep.
        sweep_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if done.returncode != 0:
            raise SystemExit(f"the sweep failed: {done.stderr[-3000:]}")
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        storage = JournalStorage(JournalFileBackend(str(repo / "comparisons" / "c.journal")))
        shown = json.loads(subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=repo, capture_output=True,
                                          text=True, check=True).stdout)
        revs = {e["name"]: e["revs"][0]["rev"] for b in shown for e in b.get("experiments") or []}
        trials = sorted(optuna.load_study(study_name="c", storage=storage).trials, key=lambda t: t.datetime_complete)
        train_dir = artifact_paths(repo)["train"].as_posix()
        points, previous = [], trials[0].datetime_start  # one at a time: a point's time is from the last one's end
        for trial in trials:
            exp = trial.user_attrs["experiment"]
            info = json.loads(subprocess.run(["git", "show", f"{revs[exp]}:{train_dir}/{RUN_INFO}"], cwd=repo,
                                             capture_output=True, text=True, check=True).stdout)
            seconds = (trial.datetime_complete - previous).total_seconds()
            previous = trial.datetime_complete
            points.append({"point": exp, "wall_s": round(seconds, 1), "train_s": info["seconds"],
                           "overhead_s": round(seconds - info["seconds"], 1)})
        figures = {"points": points, "sweep_wall_s": round(wall, 1), "sweep_cpu_s": round(sweep_cpu, 1),
                   "median_point_wall_s": statistics.median(p["wall_s"] for p in points),
                   "median_overhead_s": statistics.median(p["overhead_s"] for p in points),
                   "settings": {"points": args.points, "epochs": args.epochs, "images": [TINY_TRAIN, TINY_TEST]}}
        args.out.write_text(json.dumps(figures, indent=1))
        print(json.dumps(figures, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""A random search killed half-way and resumed, beside the same search never killed: how many
points each ends with, which ran twice, and the wall time each took.

Builds a project on a slice of a class-folder archive (the CIFAR-10 mirror), runs and commits its
baseline once, then runs `cifar10-pipeline sweep --name whole` to the end, and `--name killed`,
which is sent SIGKILL (its whole process group, as a closed terminal would) once `--kill-after`
of its points have ended, then run again under its name. One point at a time, on Prefect's own
temporary API.

    python benchmarks/sweep_resume.py --source ../shared/data/cifar10-jpeg.tar.gz --sha256 HASH \\
        [--n 16] [--kill-after 8] [--epochs 1] --out RAW.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's project set-up is reused; tests/ is not installed

from benchmarks.sweep_setup import SPACE, add_mirror_arguments, bench_env, mirror_baseline
from stages.common.trial import STUDY_DIR, study_journal
from tests.helpers import BIN


def trials(repo: Path, name: str) -> list[optuna.trial.FrozenTrial]:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = study_journal(repo, name)
    if not journal.exists():
        return []
    try:
        return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal)))).trials
    except KeyError:  # not created yet
        return []


def ended(repo: Path, name: str) -> dict[str, float]:
    return {t.user_attrs["experiment"]: t.value for t in trials(repo, name) if t.state.name == "COMPLETE"}


def sweep(repo: Path, file: Path, name: str, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run([str(BIN / "cifar10-pipeline"), "sweep", str(file), "--name", name, "--repo", str(repo)],
                          env=env, capture_output=True, text=True)
    return time.perf_counter() - started, done


def finished(repo: Path, name: str) -> dict:
    table = pd.read_csv(repo / STUDY_DIR / f"{name}.csv")
    return {"points": len(table), "ok": int((table["status"] == "ok").sum()),
            "failed": int((table["status"] == "failed").sum()),
            "best": table.iloc[0]["name"], "best_accuracy": float(table.iloc[0]["accuracy"])}


def killed_and_resumed(repo: Path, file: Path, env: dict[str, str], kill_after: int) -> dict:
    command = [str(BIN / "cifar10-pipeline"), "sweep", str(file), "--name", "killed", "--repo", str(repo)]
    started = time.perf_counter()
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    while len(ended(repo, "killed")) < kill_after:
        if first.poll() is not None:
            raise SystemExit(f"the sweep ended (exit {first.returncode}) before it was killed")
        time.sleep(1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_s = time.perf_counter() - started
    before = ended(repo, "killed")
    resumed_s, done = sweep(repo, file, "killed", env)
    if done.returncode not in (0, 1):
        raise SystemExit(f"the resumed sweep failed: {done.stderr[-3000:]}")
    after = ended(repo, "killed")
    said = next((line.split("resuming sweep killed: ", 1)[1] for line in (done.stdout + done.stderr).splitlines()
                 if "resuming sweep killed: " in line), None)
    return {"killed_after_s": round(killed_s, 1), "ended_when_killed": len(before), "resumed_s": round(resumed_s, 1),
            "wall_s": round(killed_s + resumed_s, 1), "resume_said": said,
            "kept_unchanged": sum(after.get(exp) == value for exp, value in before.items()),
            **finished(repo, "killed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mirror_arguments(parser, epochs=1)
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--kill-after", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    env = bench_env()
    with mirror_baseline(args, env, "sweep-resume-") as (repo, figures):
        figures["space"] = SPACE
        file = repo.parent / "search.yaml"
        file.write_text(yaml.safe_dump({"kind": "random", "n": args.n, "seed": args.seed, "space": SPACE}))
        whole_s, done = sweep(repo, file, "whole", env)
        if done.returncode not in (0, 1):
            raise SystemExit(f"sweep whole failed: {done.stderr[-3000:]}")
        figures["whole"] = {"wall_s": round(whole_s, 1), **finished(repo, "whole")}
        figures["killed"] = killed_and_resumed(repo, file, env, args.kill_after)
        figures["same_points_finished"] = figures["whole"]["ok"] == figures["killed"]["ok"]
        args.out.write_text(json.dumps(figures, indent=1))
        print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

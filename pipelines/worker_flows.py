"""The flows a work pool's workers run, each in a fresh clone of the git remote.

`experiment_on_pool` (deployment `cifar10-experiment/<pool>`) clones origin at a revision, runs
the pipeline there (missing inputs and stages computed elsewhere come from the DVC remote: `dvc
repro --pull`, the run-cache included), saves the result as a named DVC experiment and pushes it
with `dvc exp push origin`; any clone then sees it after `dvc exp pull origin NAME`.

`stages_on_pool` (deployment `cifar10-stages/<pool>`) runs another flow run's GPU stages: it
clones the same revision, takes the caller's params.yaml and dvc.lock, pulls the inputs the caller
pushed, runs the stages, pushes their cached outputs and hands the rest back as an experiment on
origin. The caller's side (deploy, submit, wait, take back) is pipelines/pool.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff

from pipelines.dvcrepo import RemoteUnreachable, git
from pipelines.flow import pipeline, save_experiment, stage_task
from pipelines.pool import (
    FLOW_NAME,
    STAGES_FLOW_NAME,
    push_experiment,
    pushed_experiments,
    retry_when_unreachable,
    transfer,
)
from stages.common.errors import CommandFailed, ConfigError
from stages.common.trial import STORAGE_ENV


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=retry_when_unreachable)
def clone(git_url: str, rev: str, into: Path) -> Path:
    """A full clone (DVC's experiments need the history a shallow one lacks), checked out at `rev`."""
    cloned = subprocess.run(["git", "clone", "--quiet", "--no-checkout", git_url, str(into)], capture_output=True,
                            text=True)
    if cloned.returncode != 0:
        message = cloned.stderr.strip().splitlines()[-1] if cloned.stderr.strip() else f"exit {cloned.returncode}"
        raise RemoteUnreachable(f"git clone {git_url}: {message}; check the URL and that the remote is up")
    if git(into, "checkout", "--quiet", rev) is None:
        raise ConfigError(f"revision '{rev}' is not on {git_url}; `git push` it first (workers clone the git remote)")
    return into



@flow(name=FLOW_NAME, log_prints=True)
def experiment_on_pool(
    git_url: str,
    rev: str = "HEAD",
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    stage_timeouts: dict[str, float] | None = None,
    gpu_pool: str | None = None,
    study_secret: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """Clone `git_url` at `rev`, run the pipeline with `overrides` (up to the stage `until` when
    given; its GPU stages on `gpu_pool` when given), push it as experiment `name`. A sweep's point
    that reports to its trial (train.trial) finds the study where the Secret block `study_secret`
    says (pipelines/pool.py: study_secret).

    A name the git remote already holds is not run again: a flow run Prefect starts twice, or a
    sweep rerun to retry its failed points, leaves each point's experiment exactly once.
    """
    logger = get_run_logger()
    if study_secret:  # each flow run is a process of its own: its stages inherit this
        from prefect.blocks.system import Secret

        os.environ[STORAGE_ENV] = Secret.load(study_secret).get()
    workdir = Path(tempfile.mkdtemp(prefix="cifar10-run-"))
    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        repo = clone(git_url, rev, workdir / "repo")
        timings["clone_s"] = time.perf_counter() - started
        if name and name in pushed_experiments(repo):
            logger.info(f"{name} is already on the git remote; not run again (`dvc exp pull origin {name}`)")
            return {"experiment": name, "skipped": True, "timings": timings}
        started = time.perf_counter()
        result = pipeline(repo_dir=str(repo), overrides=overrides, experiment=name, pull=True,
                          stage_timeouts=stage_timeouts, gpu_pool=gpu_pool, until=until)
        timings["pipeline_s"] = time.perf_counter() - started
        experiment = result["experiment"]
        if experiment is None:
            raise CommandFailed("nothing ran, so no experiment was saved: this revision's results are already "
                                "committed; give overrides or a name to run")
        started = time.perf_counter()
        push_experiment(repo, experiment)
        timings["push_s"] = time.perf_counter() - started
        logger.info("timings: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
        return {**result, "skipped": False, "timings": {k: round(v, 1) for k, v in timings.items()}}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@flow(name=STAGES_FLOW_NAME, log_prints=True)
def stages_on_pool(
    git_url: str,
    rev: str,
    stages: list[str],
    inputs: list[str],
    files: dict[str, str],
    handback: str,
    stage_timeouts: dict[str, float] | None = None,
) -> dict[str, float]:
    """Run `stages` for another flow run: clone `git_url` at `rev`, write its `files` (params.yaml,
    dvc.lock), pull the outputs of the `inputs` stages it pushed, run the stages, push their cached
    outputs and the rest as experiment `handback` on origin; returns each stage's seconds."""
    logger = get_run_logger()
    workdir = Path(tempfile.mkdtemp(prefix="cifar10-stages-"))
    try:
        repo = clone(git_url, rev, workdir / "repo")
        if handback in pushed_experiments(repo):  # Prefect started this flow run twice
            logger.info(f"{handback} is already on the git remote; not run again")
            return {}
        for path, text in files.items():
            (repo / path).write_text(text)
        transfer(repo, "pull", inputs)
        outcomes = [stage_task(str(repo), stage, False, (stage_timeouts or {}).get(stage), True) for stage in stages]
        transfer(repo, "push", stages)
        # The caller has the inputs' outputs; only these stages' are committed and handed back.
        save_experiment(repo, outcomes, None, handback, stages=stages)
        push_experiment(repo, handback, cache=False)
        return {o.stage: round(o.seconds, 1) for o in outcomes}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)



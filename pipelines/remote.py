"""The pipeline on a Prefect work pool: workers with nothing but the git and DVC remotes in common.

A flow run of the `cifar10-experiment/<pool>` deployment clones the git remote at a revision into
its own temporary directory, runs the stages there (missing inputs and stages computed elsewhere
come from the DVC remote: `dvc repro --pull`, the run-cache included), saves the result as a
named DVC experiment and pushes it with `dvc exp push origin` (git refs to the git remote, data,
models and run-cache to the DVC remote). Any clone then sees it after `dvc exp pull origin NAME`.

Prefect schedules the runs (work pools, workers, concurrency limits); this module only says what
one run does, and creates the deployment from the git remote (`cifar10-pipeline deploy`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff

from pipelines.dvcrepo import RemoteUnreachable, dvc, git
from pipelines.flow import pipeline
from stages.common.errors import CommandFailed, ConfigError

FLOW_NAME = "cifar10-experiment"
ENTRYPOINT = "pipelines/remote.py:experiment_on_pool"


def _transient(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), RemoteUnreachable)


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_transient)
def clone(git_url: str, rev: str, into: Path) -> Path:
    """A full clone (DVC's experiments need the history a shallow one lacks), checked out at `rev`."""
    done = subprocess.run(["git", "clone", "--quiet", "--no-checkout", git_url, str(into)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        message = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
        raise RemoteUnreachable(f"git clone {git_url}: {message}; check the URL and that the remote is up")
    if git(into, "checkout", "--quiet", rev) is None:
        raise ConfigError(f"revision '{rev}' is not on {git_url}; `git push` it first (workers clone the git remote)")
    return into


def pushed_experiments(repo: Path) -> set[str]:
    """Names of the experiments the git remote `origin` already holds (every baseline)."""
    return set(dvc(repo, "exp", "list", "origin", "--all-commits", "--name-only").split())


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=_transient)
def push_experiment(repo: Path, name: str) -> None:
    get_run_logger().info(dvc(repo, "exp", "push", "--run-cache", "origin", name).strip())


@flow(name=FLOW_NAME, log_prints=True)
def experiment_on_pool(
    git_url: str,
    rev: str = "HEAD",
    name: str | None = None,
    overrides: dict[str, Any] | None = None,
    stage_timeouts: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Clone `git_url` at `rev`, run the pipeline with `overrides`, push it as experiment `name`.

    A name the git remote already holds is not run again: a flow run Prefect starts twice, or a
    sweep rerun to retry its failed points, leaves each point's experiment exactly once.
    """
    logger = get_run_logger()
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
                          stage_timeouts=stage_timeouts)
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


# A worker machine that dies takes its flow run's process with it, and nobody reports the run's
# end: Prefect's answer is heartbeats from each run and an automation that crashes a run whose
# heartbeats stop, which frees its concurrency slot. 30 s is the shortest heartbeat Prefect allows.
HEARTBEAT_S = 30
CRASH_AFTER_S = 75
CRASH_AUTOMATION = "cifar10: crash flow runs whose heartbeats stopped"


def ensure_crash_detection() -> None:
    """Create the automation (once per server) that marks silent flow runs Crashed."""
    from datetime import timedelta

    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    try:
        Automation.read(name=CRASH_AUTOMATION)
        return
    except ValueError:
        pass
    ended = {f"prefect.flow-run.{state}" for state in ("Completed", "Failed", "Cancelled", "Crashed")}
    Automation(
        name=CRASH_AUTOMATION,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *ended},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=CRASH_AFTER_S),
        ),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {CRASH_AFTER_S} s: its worker or machine died")],
    ).create()


def deployment_name(pool: str) -> str:
    return f"{FLOW_NAME}/{pool}"


def deploy(pool: str, git_url: str, branch: str, concurrency_limit: int | None = None) -> str:
    """Create (or update) the deployment `cifar10-experiment/<pool>`: its code comes from the git
    remote, cloned by the worker for each flow run; returns its full name."""
    from prefect.runner.storage import GitRepository

    source = GitRepository(url=git_url, branch=branch)
    remote_flow = experiment_on_pool.from_source(source=source, entrypoint=ENTRYPOINT)
    remote_flow.deploy(name=pool, work_pool_name=pool, parameters={"git_url": git_url},
                       job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}},
                       concurrency_limit=concurrency_limit, print_next_steps=False, build=False, push=False)
    ensure_crash_detection()
    return deployment_name(pool)


def remote_revision(repo: Path) -> tuple[str, str, str]:
    """(git URL of origin, HEAD's commit, a branch of origin holding it): what workers clone.

    Workers see only the remotes, so HEAD must be pushed and a default DVC remote configured.
    """
    url = git(repo, "remote", "get-url", "origin")
    if not url:
        raise ConfigError("no git remote 'origin'; workers clone it: `git remote add origin URL` and `git push`")
    try:
        default = dvc(repo, "remote", "default").strip()
    except CommandFailed:  # `dvc remote default` fails when there is none
        default = ""
    if not default:
        raise ConfigError("no default DVC remote; workers share data and models through one: "
                          "`dvc remote add -d storage s3://bucket/path` (see README, Scaling out)")
    rev = git(repo, "rev-parse", "HEAD") or ""
    git(repo, "fetch", "--quiet", "origin")
    branches = (git(repo, "branch", "-r", "--format=%(refname:short)", "--contains", rev) or "").split()
    on_origin = [b.split("/", 1)[1] for b in branches if b.startswith("origin/") and b != "origin/HEAD"]
    if not on_origin:
        raise ConfigError(f"HEAD ({rev[:7]}) is not on origin; `git push` it first: workers clone the git remote")
    return url, rev, on_origin[0]


def deploy_head(repo: Path, pool: str, concurrency_limit: int | None = None) -> tuple[str, str, str]:
    """Check what workers need (see remote_revision), then deploy for `pool`: (git URL, HEAD's
    commit, deployment name)."""
    git_url, rev, branch = remote_revision(repo)
    return git_url, rev, deploy(pool, git_url, branch, concurrency_limit)


def submit(pool: str, git_url: str, rev: str, points: dict[str, dict[str, Any]], tags: list[str]) -> dict[str, Any]:
    """One flow run of the pool's deployment per point ({experiment name: overrides}), not waited for."""
    from prefect.deployments import run_deployment

    return {name: run_deployment(deployment_name(pool), timeout=0, flow_run_name=name, tags=tags,
                                 parameters={"git_url": git_url, "rev": rev, "name": name, "overrides": overrides})
            for name, overrides in points.items()}


def wait_for(runs: dict[str, Any], on_end, poll_s: float = 5.0) -> dict[str, Any]:
    """Poll the flow runs until each reaches a final state (Completed, Failed, Crashed,
    Cancelled), calling `on_end(name, state)` as each does; returns {name: final state}."""
    from prefect.client.orchestration import get_client

    final: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(runs):
            for name, run in runs.items():
                if name in final:
                    continue
                state = client.read_flow_run(run.id).state
                if state is not None and state.is_final():
                    final[name] = state
                    on_end(name, state)
            if len(final) < len(runs):
                time.sleep(poll_s)
    return final


def pull_experiment(repo: Path, name: str) -> None:
    """Its git ref and its outputs (the DVC remote), so `dvc exp show` and `compare` see it."""
    dvc(repo, "exp", "pull", "origin", name)

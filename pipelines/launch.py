"""How `cifar10-pipeline run` carries a run out: the flow here (GPU stages on a GPU pool when one is
named), the whole run on a work pool, DVC's answer for a dry run, or plain `dvc repro` when the
Prefect API is down and the user asked for that fallback. The CLI parses; this module chooses."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.prefect_server import api_reachable, flow_api, require_server
from stages.common.errors import PipelineError, TransientError
from stages.common.paths import REPORT_PAGE, artifact_paths

Say = Callable[[str], None]


@dataclass(frozen=True)
class RunRequest:
    """One `run`, as the command line asked for it (overrides and timeouts already checked)."""

    repo: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    timeouts: dict[str, float] = field(default_factory=dict)
    dry_run: bool = False
    push: bool = False
    lock_timeout_s: float = 0.0
    fallback: bool = False
    gate: bool = False
    pool: str | None = None
    gpu_pool: str | None = None
    champion: str | None = None  # gate against the version in this GTO stage


def run(request: RunRequest, api_url: str | None, say: Say, warn: Say) -> int:
    """Carry the run out where it was asked to run; the exit code (0, or plain `dvc repro`'s)."""
    if request.pool:
        run_on_pool(request, say)
        return 0
    if request.dry_run:  # DVC's answer; no flow run to record it, so no Prefect API to start
        for stage, why in dry_run_plan(request.repo, request.overrides, request.lock_timeout_s).items():
            say(f"{stage}: {why}")
        return 0
    if request.gpu_pool:
        from pipelines.pool import require_committed

        require_committed(request.repo)  # before any stage runs
        deploy_pools(request.repo, request.gpu_pool)
    if api_url and not api_reachable(api_url):
        if not request.fallback:
            raise TransientError(
                f"the Prefect API at {api_url} is unreachable; start it (cifar10-pipeline server), unset "
                "PREFECT_API_URL to use a temporary one, or rerun with --fallback to run plain `dvc repro`")
        warn(f"warning: the Prefect API at {api_url} is unreachable; running plain `dvc repro` "
             "(no Prefect logs, retries or artifacts)")
        code = plain_repro(request.repo, request.overrides)
        if code == 0 and (request.gate or request.champion):  # the gate needs no Prefect: still asked for
            from pipelines.gate import champion_verdict, gate_verdict

            verdict = champion_verdict(request.repo, request.champion) if request.champion else gate_verdict(request.repo)
            say(verdict.markdown())
            verdict.raise_if_failed()
        return code
    with flow_api(request.repo):
        run_flow(request, say)
    return 0


def deploy_pools(repo: Path, *pools: str | None) -> tuple[str, str]:
    """The deployments of each pool given, from HEAD on origin (see pool.deploy_head): (git URL, commit)."""
    from pipelines import pool as work_pool

    require_server(os.environ.get("PREFECT_API_URL"))
    for pool in filter(None, pools):
        git_url, rev, _ = work_pool.deploy_head(repo, pool)
    return git_url, rev


def run_on_pool(request: RunRequest, say: Say) -> None:
    """One flow run on the pool, waited for; its experiment is pulled here."""
    from pipelines import pool as work_pool

    git_url, rev = deploy_pools(request.repo, request.pool, request.gpu_pool)
    name = time.strftime("run-%Y%m%d-%H%M%S")
    runs = work_pool.submit(request.pool, git_url, rev, {name: request.overrides}, tags=["cli"],
                            gpu_pool=request.gpu_pool)
    say(f"submitted {name} to work pool '{request.pool}' (flow run {runs[name].id}); waiting for a worker")
    state = work_pool.wait_for(runs)[name]
    if not state.is_completed():
        raise PipelineError(f"flow run {name} ended {state.name}: {state.message}")
    work_pool.pull_experiment(request.repo, name)
    say(f"experiment: {name} (pulled from origin; `cifar10-pipeline compare {name}`)")


def dry_run_plan(repo: Path, overrides: dict[str, Any], lock_timeout: float) -> dict[str, str]:
    """Which stages a run with these overrides would run, and why: params.yaml holds them while DVC
    looks, then is restored byte for byte, under the lock a run takes."""
    from pipelines.dvcrepo import inspect_repo, overrides_applied, plan, workspace_lock

    with workspace_lock(repo, lock_timeout, "a dry run (cifar10-pipeline run --dry-run)"), \
            overrides_applied(repo / "params.yaml", overrides, lambda: False, keep=False):
        graph, reasons = inspect_repo(repo)
    return plan(graph, reasons)


def plain_repro(repo: Path, overrides: dict[str, Any]) -> int:
    """The pipeline without Prefect (DVC's own experiment runner when there are overrides): its exit code."""
    from pipelines.dvcrepo import dvc_environment

    return subprocess.call(fallback_command(overrides, dry_run=False), cwd=repo, env=dvc_environment())


def fallback_command(overrides: dict[str, Any], dry_run: bool) -> list[str]:
    from pipelines.dvcrepo import dvc_executable, set_arg

    sets = [arg for key, value in overrides.items() for arg in ("-S", set_arg(key, value))]
    command = [dvc_executable(), "exp", "run", *sets] if overrides else [dvc_executable(), "repro"]
    return [*command, "--dry"] if dry_run else command


def run_flow(request: RunRequest, say: Say) -> None:
    """The flow in this process; each stage's outcome, the experiment, accuracy and the report page."""
    from pipelines.flow import pipeline

    # A failing stage raises StageFailed with the stage's own exit code (2 config, 3 data, ...).
    result = pipeline(repo_dir=str(request.repo), overrides=request.overrides or None, push=request.push,
                      lock_timeout_s=request.lock_timeout_s, stage_timeouts=request.timeouts, gate=request.gate,
                      champion=request.champion, gpu_pool=request.gpu_pool)
    for info in result["stages"].values():
        say(info["outcome"])
    if result.get("experiment"):
        say(f"experiment: {result['experiment']}")
    if result.get("metrics"):
        say(f"accuracy: {result['metrics'].get('accuracy')}")
    page = request.repo / artifact_paths(request.repo)["report"] / REPORT_PAGE
    if page.is_file():
        say(f"report page: {page}")

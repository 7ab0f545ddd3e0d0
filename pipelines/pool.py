"""Work pools, the caller's side: deploy the worker flows, submit flow runs, wait, take results back.

The flows that run on a pool's workers are in pipelines/worker_flows.py; they share nothing with
the caller but the git remote (code, params, experiment refs) and the default DVC remote (data,
models, run-cache). A whole run is a flow run of `cifar10-experiment/<pool>`, whose experiment is
pulled from origin; a run's GPU stages can instead go to a flow run of `cifar10-stages/<pool>`,
which hands its results back as an experiment that `restore_from_pool` brings into the caller's
workspace and removes. Prefect schedules the runs (work pools, workers, concurrency limits).
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from pipelines.dvcrepo import (
    RemoteUnreachable,
    StageOutcome,
    dvc,
    git,
    git_tracked_outputs,
)
from pipelines.runs import experiment_commit
from stages.common.errors import CommandFailed, ConfigError, StageFailed

FLOW_NAME = "cifar10-experiment"
ENTRYPOINT = "pipelines/worker_flows.py:experiment_on_pool"
STAGES_FLOW_NAME = "cifar10-stages"
STAGES_ENTRYPOINT = "pipelines/worker_flows.py:stages_on_pool"
# What a GPU pool's flow run needs of its caller's workspace besides the commit.
HANDED_OVER = ("params.yaml", "dvc.lock")


def retry_when_unreachable(task, task_run, state) -> bool:
    return isinstance(state.result(raise_on_failure=False), RemoteUnreachable)


def pushed_experiments(repo: Path) -> set[str]:
    """Names of the experiments the git remote `origin` already holds (every baseline)."""
    return set(dvc(repo, "exp", "list", "origin", "--all-commits", "--name-only").split())


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=retry_when_unreachable)
def push_experiment(repo: Path, name: str, cache: bool = True) -> None:
    """Git refs to origin and, with `cache`, outputs and run-cache to the DVC remote."""
    get_run_logger().info(dvc(repo, "exp", "push", *(["--run-cache"] if cache else ["--no-cache"]), "origin", name).strip())


@task(retries=2, retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=retry_when_unreachable)
def transfer(repo: Path, command: str, stages: list[str]) -> None:
    """`dvc push` or `dvc pull` of the stages' cached outputs, retried when the remote is unreachable."""
    get_run_logger().info(dvc(repo, command, *stages).strip() or f"dvc {command}: nothing to transfer")



def run_stages_on_pool(repo: Path, stages: list[str], inputs: list[str], pool: str, handback: str,
                       timeouts: dict[str, float], log: Callable[[str], None]) -> list[StageOutcome]:
    """Send `stages` to a flow run of `cifar10-stages/<pool>` and wait; then bring their results
    into `repo` as if they had run here. The inputs' outputs go to the DVC remote first."""
    from prefect.deployments import run_deployment

    git_url, rev, _ = remote_revision(repo)
    require_committed(repo)
    transfer(repo, "push", inputs)
    started = time.perf_counter()
    log(f"sending {', '.join(stages)} to work pool '{pool}' as flow run {handback}")
    run = run_deployment(f"{STAGES_FLOW_NAME}/{pool}", flow_run_name=handback, timeout=None, parameters={
        "git_url": git_url, "rev": rev, "stages": stages, "inputs": inputs, "handback": handback,
        "files": {path: (repo / path).read_text() for path in HANDED_OVER if (repo / path).is_file()},
        "stage_timeouts": {s: t for s, t in timeouts.items() if s in stages}})
    state = run.state
    if state is None or not state.is_completed():
        name, message = (state.name, state.message) if state else ("without a state", "")
        raise StageFailed(stages[0], f"flow run {handback} on work pool '{pool}' ended {name}: {message} "
                                     "(its logs are in the Prefect UI)", None)
    log(f"{handback} completed in {time.perf_counter() - started:.0f} s (waiting, cloning and pushing included)")
    restore_from_pool(repo, handback, stages)
    seconds = stage_seconds(run.id)
    return [StageOutcome(stage, ran=True, seconds=seconds.get(stage, 0.0), pool=pool) for stage in stages]


def stage_seconds(flow_run_id) -> dict[str, float]:
    """Each stage task's run time in that flow run, as Prefect's server recorded it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id])))
    return {run.name: run.total_run_time.total_seconds() for run in runs}


def restore_from_pool(repo: Path, handback: str, stages: list[str]) -> None:
    """The hand-off experiment's dvc.lock and the stages' outputs into this workspace (exactly its
    files: stale ones removed first); then the experiment is removed here and from origin."""
    dvc(repo, "exp", "pull", "--no-cache", "origin", handback)
    commit = experiment_commit(repo, handback)
    if commit is None:
        raise CommandFailed(f"experiment {handback} is not on origin after its flow run completed; rerun")
    tracked = git_tracked_outputs(repo, stages)
    for path in tracked:
        if (repo / path).is_dir():
            shutil.rmtree(repo / path)
        else:
            (repo / path).unlink(missing_ok=True)
    if git(repo, "restore", f"--source={commit}", "--worktree", "--", *HANDED_OVER[1:], *tracked) is None:
        raise CommandFailed(f"could not restore {', '.join(tracked)} from experiment {handback}; rerun")
    transfer(repo, "pull", stages)
    dvc(repo, "exp", "remove", "--git-remote", "origin", handback)
    dvc(repo, "exp", "remove", handback)


def require_committed(repo: Path) -> None:
    """The GPU pool's workers clone the commit: an uncommitted change (code, dvc.yaml) would not
    reach them. params.yaml and dvc.lock travel with the flow run; outputs are the run's own."""
    travels = {*HANDED_OVER, *git_tracked_outputs(repo)}
    changed = (git(repo, "diff", "--name-only", "HEAD") or "").splitlines()
    left = [path for path in changed if path not in travels and not path.endswith(".gitignore")
            and not any(path.startswith(f"{out}/") for out in travels)]
    if left:
        raise ConfigError(f"uncommitted changes to {', '.join(left)} would not reach the GPU pool's workers "
                          "(they clone origin); commit and push them")


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


def deploy_from_origin(entrypoint: str, name: str, pool: str, git_url: str, branch: str,
                       parameters: dict[str, Any], concurrency_limit: int | None = None, cron: str | None = None) -> None:
    """A deployment whose code a worker clones from `git_url` at `branch` for each flow run; its
    flow runs send heartbeats, and a run whose heartbeats stop is marked Crashed."""
    from prefect import Flow
    from prefect.runner.storage import GitRepository

    # Prefect loads the flow from the source, as a worker will: deploying imports no worker code here.
    Flow.from_source(source=GitRepository(url=git_url, branch=branch), entrypoint=entrypoint).deploy(
        name=name, work_pool_name=pool, parameters=parameters, cron=cron,
        job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S)}},
        concurrency_limit=concurrency_limit, print_next_steps=False, build=False, push=False,
        ignore_warnings=True)  # a process pool is what we mean, not local development
    ensure_crash_detection()


def deploy(pool: str, git_url: str, branch: str, concurrency_limit: int | None = None) -> str:
    """Create (or update) the pool's deployments, `cifar10-experiment/<pool>` (whole runs) and
    `cifar10-stages/<pool>` (another run's GPU stages); returns the first's full name."""
    for entrypoint, parameters in ((ENTRYPOINT, {"git_url": git_url}), (STAGES_ENTRYPOINT, {})):
        deploy_from_origin(entrypoint, pool, pool, git_url, branch, parameters, concurrency_limit)
    return deployment_name(pool)


def shared_remotes(repo: Path) -> str:
    """The git URL of origin, once checked that the repo also has a default DVC remote: workers
    see nothing else."""
    url = git(repo, "remote", "get-url", "origin")
    if not url:
        raise ConfigError("no git remote 'origin'; workers clone it: `git remote add origin URL` and `git push`")
    try:
        default = dvc(repo, "remote", "default").strip()
    except CommandFailed:  # `dvc remote default` fails when there is none
        default = ""
    if not default:
        raise ConfigError("no default DVC remote; workers share data and models through one: "
                          "`dvc remote add -d storage s3://bucket/path` (see docs/scaling.md)")
    return url


def remote_revision(repo: Path) -> tuple[str, str, str]:
    """(git URL of origin, HEAD's commit, a branch of origin holding it): what workers clone.

    Workers see only the remotes, so HEAD must be pushed and a default DVC remote configured.
    """
    url = shared_remotes(repo)
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


def study_secret(storage: str) -> str:
    """The name of a Prefect Secret block that holds a sweep's study storage (a database URL may
    hold a password). A flow run's parameters travel through Prefect's API as JSON, where a
    SecretStr is only its mask: the worker's flow run loads the block instead."""
    from prefect.blocks.system import Secret

    name = "cifar10-study-" + hashlib.sha256(storage.encode()).hexdigest()[:16]
    Secret(value=storage).save(name, overwrite=True)
    return name


def submit(pool: str, git_url: str, rev: str, points: dict[str, dict[str, Any]], tags: list[str],
           gpu_pool: str | None = None, study_storage: str | None = None, until: str | None = None) -> dict[str, Any]:
    """One flow run of the pool's deployment per point ({experiment name: overrides}), not waited
    for; with `gpu_pool`, each sends its GPU stages there; with `study_storage`, its training
    reports to the sweep's study there; with `until`, it runs that stage and those before it."""
    from prefect.deployments import run_deployment

    extra = {**({"gpu_pool": gpu_pool} if gpu_pool else {}),
             **({"study_secret": study_secret(study_storage)} if study_storage else {}),
             **({"until": until} if until else {})}
    return {name: run_deployment(deployment_name(pool), timeout=0, flow_run_name=name, tags=tags,
                                 parameters={"git_url": git_url, "rev": rev, "name": name, "overrides": overrides,
                                             **extra})
            for name, overrides in points.items()}


def wait_for(runs: dict[str, Any], poll_s: float = 5.0, any_of: bool = False,
             on_poll: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Poll the flow runs until each reaches a final state (Completed, Failed, Crashed,
    Cancelled), or with `any_of` until one or more do, calling `on_poll({name: state})` after each
    look at those still waited for; returns {name: final state} of those that ended."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    final: dict[str, Any] = {}
    with get_client(sync_client=True) as client:
        while len(final) < len(runs):
            # One request for all of them: the server shares the machine with the work it waits for.
            waited = {run.id: name for name, run in runs.items() if name not in final}
            read = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=list(waited))),
                                         limit=len(waited))
            states = {waited[run.id]: run.state for run in read}
            final |= {name: state for name, state in states.items() if state is not None and state.is_final()}
            if on_poll is not None:
                on_poll({name: state for name, state in states.items() if state is not None})
            if final and any_of:
                break
            if len(final) < len(runs):
                time.sleep(poll_s)
    return final


def pull_experiment(repo: Path, name: str, outputs: bool = True) -> None:
    """Its git ref, so `dvc exp show` and `compare` see it, and with `outputs` what it keeps in
    the DVC remote (its model), so it can be applied."""
    dvc(repo, "exp", "pull", *([] if outputs else ["--no-cache"]), "origin", name)


def pull_outputs_if_pushed(repo: Path, name: str) -> None:
    """The outputs of an experiment origin holds (a sweep on a pool pulled only its ref), before it
    is applied: without its model, the stages after it would train it again."""
    if "origin" not in (git(repo, "remote") or "").split():
        return
    try:
        pushed = name in pushed_experiments(repo)
    except CommandFailed:  # origin unreachable: what the local cache holds is all there is
        return
    if pushed:
        pull_experiment(repo, name)

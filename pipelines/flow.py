"""The Prefect flow: one task per DVC stage, in the order DVC's graph gives.

DVC decides what is up to date (each task is `dvc repro --single-item <stage>`); Prefect adds
logs, retries, timeouts, artifacts and schedules. Overrides (`{"train.epochs": 5}`) are applied
to params.yaml and the finished run is saved as a DVC experiment named after the flow run, so it
shows in `dvc exp show` next to the others.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.tasks import exponential_backoff

from pipelines import progress
from pipelines.dvcrepo import (
    StageGraph,
    StageOutcome,
    dvc,
    git_tracked_outputs,
    inspect_repo,
    overrides_applied,
    plan,
    run_stage,
    stop_all_stages,
    workspace_lock,
)
from pipelines.gate import GateVerdict, champion_verdict, gate_verdict
from pipelines.pool import run_stages_on_pool
from stages.common import dataio
from stages.common.errors import StageFailed
from stages.common.paths import MANIFEST, evaluation_files

FLOW_NAME = "cifar10-pipeline"
REPORT_ARTIFACT = "cifar10-report"
METRICS_ARTIFACT = "cifar10-metrics"


def publish_gate_verdict(repo: Path, champion: str | None = None) -> GateVerdict:
    """The quality gate against the newest metrics on main, or against the version GTO assigns to
    the `champion` stage, as a Prefect artifact too."""
    verdict = champion_verdict(repo, champion) if champion else gate_verdict(repo)
    get_run_logger().info(verdict.markdown())
    create_markdown_artifact(verdict.markdown(), key="cifar10-gate", description="Quality gate verdict")
    return verdict


def _flow_run_name() -> str:
    return runtime.flow_run.name or "a flow run"


def _flow_run_id() -> str | None:
    return runtime.flow_run.id


def experiment_name(run_name: str, run_id: str | None) -> str:
    """Unique per flow run: Prefect reuses run names, so the id is part of it."""
    return f"prefect-{run_name}-{(run_id or 'local').replace('-', '')[:8]}"


def assert_nothing_stale(repo: Path, stages: list[str]) -> None:
    """A finished flow run leaves the workspace consistent: DVC finds the stages it ran up to date."""
    _, reasons = inspect_repo(repo)
    reasons = {stage: why for stage, why in reasons.items() if stage in stages}
    if reasons:
        stale = "; ".join(f"{stage}: {', '.join(why)}" for stage, why in reasons.items())
        raise StageFailed("pipeline", f"stages are still stale after the run ({stale}); rerun", None)


def check_stages_to_run(repo: Path, stage_plan: dict[str, str], gpu_pool: str | None) -> None:
    """What a stage that will run would refuse after the stages before it ran, refused first: a
    model that does not build, a GPU that is not there; and a local source that changed in place
    since download read it, which DVC cannot see."""
    from stages.common.params import load_section
    from stages.common.paths import artifact_paths
    from stages.common.run_params import check_train_section

    params_file = repo / "params.yaml"
    manifest = repo / artifact_paths(repo)["raw"] / MANIFEST
    if stage_plan.get("download") == "up to date" and manifest.is_file():
        from stages.download import check_source_unchanged

        with contextlib.chdir(repo):  # a relative source starts at the project root, as the stage reads it
            check_source_unchanged(load_section("download", params_file), dataio.read_json(manifest))
    if stage_plan.get("train", "up to date") != "up to date":
        check_train_section(load_section("train", params_file), local=gpu_pool is None)


def _transient_only(task, task_run, state) -> bool:
    """Retry a stage only when it failed for a reason worth retrying (network, lock busy)."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, StageFailed) and error.transient


# run_stage enforces a stage's timeout itself, stopping the stage's whole process group; a Prefect
# timeout would only interrupt the task's thread.
@task(name="dvc-stage", task_run_name="{stage}")
def stage_task(repo_dir: str, stage: str, up_to_date: bool, timeout_s: float | None = None,
               pull: bool = False) -> StageOutcome:
    logger = get_run_logger()
    if up_to_date:
        # `dvc status` already said so and nothing upstream ran: `dvc repro` would only skip it.
        outcome = StageOutcome(stage, ran=False, seconds=0.0)
    elif stage == progress.STAGE:
        with training_progress(Path(repo_dir), logger.info, logger.warning):
            outcome = run_stage(Path(repo_dir), stage, log=logger.info, timeout_s=timeout_s, pull=pull)
    else:
        outcome = run_stage(Path(repo_dir), stage, log=logger.info, timeout_s=timeout_s, pull=pull)
    logger.info(outcome.describe())
    return outcome


def training_progress(repo: Path, log: Callable[[str], None], warn: Callable[[str], None]) -> progress.Watcher:
    """The train stage's epochs as they end, from DVCLive's files: a Prefect progress artifact
    (the UI draws a bar under the epoch's line) and a log line each."""
    from stages.common.paths import artifact_paths

    artifact_id = create_progress_artifact(0.0, key=progress.ARTIFACT_KEY, description="Training: epochs done")

    def report(epoch: progress.Epoch) -> None:
        line = epoch.describe()
        update_progress_artifact(artifact_id, epoch.percent, description=line)
        log(line)

    return progress.Watcher(repo / artifact_paths(repo)["train"], time.time(), report, warn)


@task(name="dvc-download", task_run_name="{stage}", retries=3, retry_condition_fn=_transient_only,
      retry_delay_seconds=exponential_backoff(backoff_factor=5))
def download_task(repo_dir: str, stage: str, up_to_date: bool, timeout_s: float | None = None,
                  pull: bool = False) -> StageOutcome:
    """The one stage that touches the network: retried with back-off, on transient failures only."""
    return stage_task.fn(repo_dir, stage, up_to_date, timeout_s, pull)


@task(name="gpu-pool", task_run_name="{stages} on {pool}")
def gpu_pool_task(repo_dir: str, stages: list[str], pool: str, inputs: list[str], up_to_date: bool,
                  timeouts: dict[str, float]) -> list[StageOutcome]:
    """Consecutive GPU stages as one flow run on the GPU pool (one clone there, one hand-back)."""
    if up_to_date:
        return [StageOutcome(stage, ran=False, seconds=0.0) for stage in stages]
    handback = f"{experiment_name(_flow_run_name(), _flow_run_id())}-{'-'.join(stages)}"
    outcomes = run_stages_on_pool(Path(repo_dir), stages, inputs, pool, handback, timeouts, log=get_run_logger().info)
    for outcome in outcomes:
        get_run_logger().info(outcome.describe())
    return outcomes


def batches(graph: StageGraph, gpu_pool: str | None) -> list[list[str]]:
    """The stages in DVC's order, each alone, except that with a GPU pool consecutive GPU stages
    go there together."""
    groups: list[list[str]] = []
    for stage in graph.order:
        if gpu_pool and stage in graph.gpu and groups and groups[-1][-1] in graph.gpu:
            groups[-1].append(stage)
        else:
            groups.append([stage])
    return groups


def run_stages(repo: Path, graph: StageGraph, stale: set[str], timeouts: dict[str, float],
               outcomes: list[StageOutcome], pull: bool = False, gpu_pool: str | None = None) -> list[StageOutcome]:
    """The stages in DVC's order, one task each (or one for a batch sent to the GPU pool),
    appending to `outcomes`; a failure stops the rest.

    They form a chain, so each runs when the one before has finished: there is nothing to run
    side by side, and a task called directly is what Prefect's examples do then.
    """
    finished: dict[str, StageOutcome] = {}
    for group in batches(graph, gpu_pool):
        inputs = sorted({u for stage in group for u in graph.upstream[stage]} - set(group))
        # Stale also covers a stage whose outputs are not in this workspace (a fresh clone): with
        # `pull` DVC fetches them, or restores the stage from the remote's run-cache.
        up_to_date = not any(stage in stale for stage in group) and not any(finished[u].ran for u in inputs)
        try:
            if gpu_pool and group[0] in graph.gpu:
                results = gpu_pool_task(str(repo), group, gpu_pool, inputs, up_to_date, timeouts)
            else:
                run = download_task if group[0] == "download" else stage_task
                results = [run(str(repo), group[0], up_to_date, timeouts.get(group[0]), pull)]
        except StageFailed:
            skipped = graph.order[graph.order.index(group[-1]) + 1:]
            get_run_logger().error(f"{', '.join(group)} failed; not run: {', '.join(skipped) or 'nothing'}")
            raise
        finally:
            stop_all_stages()  # stopped or failed: leave no stage process behind
        for outcome in results:
            finished[outcome.stage] = outcome
            outcomes.append(outcome)
    return outcomes


def log_plan(graph: StageGraph, reasons: dict[str, list[str]]) -> dict[str, str]:
    stage_plan = plan(graph, reasons)
    for stage, what in stage_plan.items():
        get_run_logger().info(f"plan: {stage}: {what}")
    return stage_plan


def save_experiment(repo: Path, outcomes: list[StageOutcome], overrides: dict[str, Any] | None,
                    name: str | None = None, stages: list[str] | None = None) -> str | None:
    """A run with overrides (or a name) becomes a DVC experiment, by default named after the flow
    run (dvc exp show); with `stages`, DVC commits only their outputs (the others may be absent)."""
    if not overrides and not name:
        return None
    if not any(o.ran for o in outcomes):
        get_run_logger().info("nothing ran: the workspace already holds these results; no new experiment saved")
        return None
    experiment = name or experiment_name(_flow_run_name(), _flow_run_id())
    # Metrics and curves are git's to track; include them even before their first commit.
    include = [arg for path in git_tracked_outputs(repo) if (repo / path).exists() for arg in ("-I", path)]
    dvc(repo, "exp", "save", "--name", experiment, *include, "-m", f"prefect flow run {_flow_run_id()}", *(stages or []))
    get_run_logger().info(f"saved as DVC experiment {experiment} (dvc exp show)")
    return experiment


def push_outputs(repo: Path) -> None:
    """Data, models and DVC's run-cache to the default remote: a clone elsewhere then finds each
    stage up to date after `dvc pull`, and `--pull` restores the stages whose outputs DVC caches
    from the run-cache (git-tracked outputs do not travel with a run-cache entry)."""
    get_run_logger().info(dvc(repo, "push", "--run-cache").strip() or "dvc push: nothing to push")


def publish_artifacts(repo: Path, outcomes: list[StageOutcome], experiment: str | None,
                      verdict: GateVerdict | None = None) -> dict[str, Any]:
    """Markdown and table artifacts under stable keys, so the Prefect UI keeps their history."""
    from stages.common.render import per_class_table

    files = evaluation_files(repo)
    metrics_path, report_path = repo / files["metrics"], repo / files["report"]
    if not metrics_path.is_file():
        return {}
    metrics = json.loads(metrics_path.read_text())
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    markdown = "\n".join([
        "# CIFAR-10 pipeline run",
        "",
        f"**Accuracy {metrics.get('accuracy')}**, macro F1 {metrics.get('f1_macro')}, loss {metrics.get('loss')}",
        "",
        "Stages: " + "; ".join(o.describe() for o in outcomes),
        *(["", f"Saved as DVC experiment `{experiment}`."] if experiment else []),
        *(["", verdict.markdown()] if verdict else []),
        "",
        per_class_table(report) if report else "",
    ])
    create_markdown_artifact(markdown, key=REPORT_ARTIFACT, description="Headline of the pipeline's report")
    create_table_artifact([{"metric": k, "value": v} for k, v in metrics.items()], key=METRICS_ARTIFACT,
                          description="Evaluation metrics")
    return metrics


def summary(outcomes: list[StageOutcome], experiment: str | None, metrics: dict[str, Any]) -> dict[str, Any]:
    get_run_logger().info("summary: " + " | ".join(o.describe() for o in outcomes))
    return {
        "stages": {o.stage: {"ran": o.ran, "seconds": round(o.seconds, 1), "from_run_cache": o.from_run_cache,
                             "outcome": o.describe()} for o in outcomes},
        "experiment": experiment,
        "metrics": metrics,
    }


@flow(name=FLOW_NAME, log_prints=True)
def pipeline(
    repo_dir: str = ".",
    overrides: dict[str, Any] | None = None,
    dry_run: bool = False,
    push: bool = False,
    stage_timeouts: dict[str, float] | None = None,
    lock_timeout_s: float = 0.0,
    gate: bool = False,
    champion: str | None = None,
    experiment: str | None = None,
    pull: bool = False,
    gpu_pool: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """Run the DVC pipeline in `repo_dir` (with `until`, that stage and those it depends on, as
    `dvc repro STAGE` does); stages DVC finds up to date are skipped. `experiment`
    names the DVC experiment the run is saved as; `pull` takes missing data and stages computed
    elsewhere from the DVC remote (its run-cache) instead of running them; `gpu_pool` sends the
    stages dvc.yaml marks `accelerator: gpu` (train, evaluate) to that work pool's workers;
    `champion` ends with the gate against the version GTO assigns to that stage (see `gate`)."""
    repo = Path(repo_dir).resolve()
    outcomes: list[StageOutcome] = []
    with workspace_lock(repo, lock_timeout_s, f"flow run {_flow_run_name()}"), \
            overrides_applied(repo / "params.yaml", overrides, lambda: any(o.ran for o in outcomes), keep=not dry_run):
        graph, reasons = inspect_repo(repo)
        if until:
            graph = graph.up_to(until)
            reasons = {stage: why for stage, why in reasons.items() if stage in graph.order}
        stage_plan = log_plan(graph, reasons)
        if dry_run:
            return {"plan": stage_plan}
        check_stages_to_run(repo, stage_plan, gpu_pool)
        run_stages(repo, graph, set(reasons), stage_timeouts or {}, outcomes, pull, gpu_pool)
        if any(o.ran for o in outcomes):
            assert_nothing_stale(repo, graph.order)
        experiment = save_experiment(repo, outcomes, overrides, experiment, stages=graph.order if until else None)
        if push:
            push_outputs(repo)
        verdict = publish_gate_verdict(repo, champion) if gate or champion else None
        metrics = publish_artifacts(repo, outcomes, experiment, verdict)
        if verdict is not None:
            verdict.raise_if_failed()
        return summary(outcomes, experiment, metrics)

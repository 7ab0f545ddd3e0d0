"""Sweeps: a grid, a random or a Bayesian (Optuna's TPE) search over params, each point a queued
DVC experiment.

Points run through DVC's own queue (`dvc exp run --queue`, then `--run-all -j N`), each in its own
temporary workspace, so every point stays in `dvc exp show`, its outputs in DVC's cache, and any
one can be promoted with `dvc exp branch` / `dvc exp apply` (`cifar10-pipeline promote`). A TPE
search asks Optuna for `jobs` points at a time and tells it each one's metric as it ends.
Progress (done, failed, remaining, best so far) is logged as points finish. With a work pool
(`pool`), each point is instead a flow run of the pool's deployment (pipelines/pool.py), taken by
whichever workers serve it, and its experiment is pulled from the git and DVC remotes.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipelines.compare import safe_name
from pipelines.dvcrepo import dvc, dvc_environment, dvc_executable, set_arg
from pipelines.runs import experiments_table
from stages.common.errors import ConfigError
from stages.common.params import read_params, whole_lists
from stages.common.run_params import check_overrides

OUT_DIR = Path("comparisons")


def _values(spec: Any) -> list[Any]:
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict) and "choice" in spec:
        return list(spec["choice"])
    raise ConfigError(f"a grid needs a list of values (or {{choice: [...]}}), got {spec!r}")


def _draw(spec: Any, rng: np.random.Generator) -> Any:
    if isinstance(spec, list):
        return spec[rng.integers(len(spec))]
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"unknown search space entry {spec!r}; use a list, choice, uniform, log_uniform or int_uniform")
    (kind, args), = spec.items()
    if kind == "choice":
        return args[rng.integers(len(args))]
    if kind == "uniform":
        return float(rng.uniform(args[0], args[1]))
    if kind == "log_uniform":
        return float(math.exp(rng.uniform(math.log(args[0]), math.log(args[1]))))
    if kind == "int_uniform":
        return int(rng.integers(args[0], args[1] + 1))
    raise ConfigError(f"unknown search space kind '{kind}'; use choice, uniform, log_uniform or int_uniform")


def sample_points(space: dict[str, Any], kind: str, n: int, seed: int) -> list[dict[str, Any]]:
    """The sweep's points: the full grid, or `n` seeded random draws."""
    if kind == "grid":
        keys = list(space)
        return [dict(zip(keys, combo)) for combo in itertools.product(*(_values(space[k]) for k in keys))]
    if kind != "random":
        raise ConfigError(f"sweep kind '{kind}' is not grid, random or tpe")
    rng = np.random.default_rng(seed)
    return [{k: _draw(v, rng) for k, v in space.items()} for _ in range(n)]


def _rounded(value: Any) -> Any:
    # Six significant digits keep a random draw's experiment params readable.
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _override(key: str, value: Any) -> str:
    return set_arg(key, _rounded(value))


POLL_S = 5.0  # how often a running batch's queue is read for finished points


def queue_statuses(repo: Path) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed} from `dvc queue status`."""
    import subprocess

    status = subprocess.run([dvc_executable(), "queue", "status"], cwd=repo, env=dvc_environment(), capture_output=True,
                            text=True).stdout
    rows = [line.split() for line in status.splitlines()[1:]]
    return {row[1]: row[-1] for row in rows if len(row) >= 4}


def optuna_distributions(space: dict[str, Any]) -> dict[str, Any]:
    """The search space as Optuna distributions (the same entries random search draws from)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            out[key] = CategoricalDistribution(spec)
            continue
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(f"unknown search space entry {spec!r}; use a list, choice, uniform, log_uniform or int_uniform")
        (kind, args), = spec.items()
        makers = {"choice": lambda a: CategoricalDistribution(a), "uniform": lambda a: FloatDistribution(a[0], a[1]),
                  "log_uniform": lambda a: FloatDistribution(a[0], a[1], log=True),
                  "int_uniform": lambda a: IntDistribution(a[0], a[1])}
        if kind not in makers:
            raise ConfigError(f"unknown search space kind '{kind}'; use choice, uniform, log_uniform or int_uniform")
        out[key] = makers[kind](args)
    return out


class Progress:
    """Which points ended, their metric, and one log line per change: done/failed/remaining, best so far."""

    def __init__(self, repo: Path, total: int, sort_by: str, logger) -> None:
        self.repo, self.total, self.sort_by, self.logger = repo, total, sort_by, logger
        self.metric: dict[str, float] = {}
        self.failed: list[str] = []

    def ended(self, names: set[str]) -> None:
        table = experiments_table(self.repo, sort_by=None)
        rows = {row["name"]: row for row in table.to_dict("records")} if not table.empty else {}
        for exp in sorted(names):
            row = rows.get(exp, {})
            if row.get("status") == "ok" and pd.notna(row.get(self.sort_by)):
                self.metric[exp] = float(row[self.sort_by])
            else:
                self.failed.append(exp)
        done = len(self.metric) + len(self.failed)
        best = max(self.metric, key=self.metric.get) if self.metric else None
        so_far = f"best so far {best} ({self.sort_by} {self.metric[best]})" if best else "no point finished yet"
        self.logger.info(f"progress: {done}/{self.total} ended, {len(self.failed)} failed, "
                         f"{self.total - done} remaining; {so_far}")


def run_batch(repo: Path, batch: list[tuple[str, dict[str, Any]]], jobs: int, progress: Progress, logger) -> None:
    """Queue the batch's points and run them, `jobs` at a time, reporting each as it ends."""
    import subprocess

    for exp, point in batch:
        sets = [arg for key, value in point.items() for arg in ("-S", _override(key, value))]
        dvc(repo, "exp", "run", "--queue", "--name", exp, *sets)
        logger.info(f"queued {exp}: {point}")
    pending = {exp for exp, _ in batch}
    runner = subprocess.Popen([dvc_executable(), "exp", "run", "--run-all", "--jobs", str(jobs)], cwd=repo,
                              env=dvc_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while pending:
            finished = runner.poll() is not None
            statuses = queue_statuses(repo)
            ended = pending if finished else {exp for exp in pending if statuses.get(exp) in ("Success", "Failed")}
            if ended:
                progress.ended(ended)
                pending -= ended
            elif not finished:
                time.sleep(POLL_S)
    finally:
        if runner.poll() is None:  # interrupted: stop the queue's run with it
            runner.terminate()
        runner.wait()


def run_on_pool(repo: Path, batch: list[tuple[str, dict[str, Any]]], jobs: int, progress: Progress, logger, *,
                pool: str, git_url: str, rev: str, sweep_name: str, gpu_pool: str | None = None) -> None:
    """The batch's points as flow runs of the pool's deployment, taken by however many workers
    serve the pool (`jobs` does not apply); each finished point's experiment is pulled from origin.
    A point origin already holds (this sweep ran before) is pulled, not run again: rerunning a
    sweep retries its failed points alone."""
    from pipelines import pool as work_pool

    on_origin = work_pool.pushed_experiments(repo)
    again = [exp for exp, _ in batch if exp in on_origin]
    for exp in again:
        work_pool.pull_experiment(repo, exp)
        logger.info(f"{exp} is already on origin (an earlier run of this sweep): pulled, not run again")
    if again:
        progress.ended(set(again))
    todo = {exp: {k: _rounded(v) for k, v in point.items()} for exp, point in batch if exp not in on_origin}
    runs = work_pool.submit(pool, git_url, rev, todo, tags=[f"sweep:{sweep_name}"], gpu_pool=gpu_pool)
    for exp, run in runs.items():
        logger.info(f"submitted {exp} to work pool '{pool}' (flow run {run.id}): {todo[exp]}")

    def ended(exp: str, state) -> None:
        if state.is_completed():
            work_pool.pull_experiment(repo, exp)
        else:
            logger.error(f"{exp}: flow run {state.name} ({state.message}); rerun the sweep to retry failed points alone")
        progress.ended({exp})

    work_pool.wait_for(runs, ended, POLL_S)


@flow(name="cifar10-sweep", log_prints=True)
def sweep(
    repo_dir: str = ".",
    space: dict[str, Any] | None = None,
    kind: str = "random",
    n: int = 4,
    seed: int = 0,
    jobs: int = 1,
    name: str | None = None,
    sort_by: str = "accuracy",
    pool: str | None = None,
    gpu_pool: str | None = None,
) -> dict[str, Any]:
    """Queue one DVC experiment per point, run them (`jobs` at a time, or as flow runs on the
    work pool `pool`, each sending its GPU stages to `gpu_pool` when given), then rank them."""
    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    if kind == "tpe":
        optuna_distributions(space or {})  # a bad space fails before anything runs
        points = []
    else:
        params = read_params(repo / "params.yaml")
        points = [whole_lists(point, params) for point in sample_points(space or {}, kind, n, seed)]
    for point in points:  # a point the schema refuses would only fail later, in its own run
        check_overrides(repo / "params.yaml", point)
    name = safe_name(name or time.strftime("sweep-%Y%m%d-%H%M%S"))
    runner = run_batch
    if pool:
        from pipelines import pool as work_pool

        for target in filter(None, (pool, gpu_pool)):  # before anything is submitted
            git_url, rev, deployment = work_pool.deploy_head(repo, target)
            logger.info(f"deployment {deployment}: workers clone {git_url} at {rev[:7]}")
        runner = functools.partial(run_on_pool, pool=pool, git_url=git_url, rev=rev, sweep_name=name,
                                   gpu_pool=gpu_pool)
    total = n if kind == "tpe" else len(points)
    progress = Progress(repo, total, sort_by, logger)
    started = time.perf_counter()
    if kind == "tpe":
        names, points = tpe_search(repo, space or {}, n, seed, jobs, name, progress, logger, runner)
    else:
        names = [f"{name}-{i}" for i in range(1, len(points) + 1)]
        runner(repo, list(zip(names, points)), jobs, progress, logger)
    where = f"on work pool '{pool}'" if pool else f"with {jobs} job(s)"
    logger.info(f"ran {total} points in {time.perf_counter() - started:.0f} s {where}")

    table = experiments_table(repo, sort_by=sort_by)
    mine = table[table["name"].isin(names)] if not table.empty else table
    finished = {row["name"]: row for row in mine.to_dict("records") if row["name"] in progress.metric}
    failed = sorted(set(names) - set(finished))
    points_by_name = dict(zip(names, points))
    rows = [{"name": n_, **points_by_name[n_], **{k: r.get(k) for k in ("accuracy", "f1_macro", "loss")}, "status": "ok"}
            for n_, r in finished.items() if n_ not in failed]
    rows += [{"name": n_, **points_by_name[n_], "status": "failed"} for n_ in failed]
    for n_ in failed:
        retry = "rerun the sweep with --name " + name + " --pool " + pool if pool else "`dvc exp run` and these -S values"
        logger.error(f"{n_} failed: {points_by_name[n_]}; rerun it alone with {retry}")
    result = pd.DataFrame(rows)
    if "accuracy" in result:
        result = result.sort_values("accuracy", ascending=False, na_position="last").reset_index(drop=True)
    best = result.iloc[0].to_dict() if not result.empty and result.iloc[0]["status"] == "ok" else None

    out = repo / OUT_DIR
    out.mkdir(exist_ok=True)
    result.to_csv(out / f"{name}.csv", index=False)
    summary = [f"# Sweep {name}", "", f"{len(points)} points ({kind}), {len(failed)} failed.", "",
               result.to_markdown(index=False)]
    if best:
        summary += ["", (f"Best: `{best['name']}` accuracy {best.get('accuracy')}; "
                        f"promote it with `cifar10-pipeline promote {best['name']} --branch {best['name']}`")]
    (out / f"{name}.md").write_text("\n".join(summary) + "\n")
    create_table_artifact(result.astype(object).where(result.notna(), None).to_dict("records"),
                          key=safe_name(f"sweep-{name}").lower(), description=f"Sweep {name}")
    create_markdown_artifact("\n".join(summary), key="cifar10-sweep", description="Latest sweep")
    return {"name": name, "points": len(points), "failed": failed, "best": best, "table": str(out / f"{name}.csv")}


def tpe_search(repo: Path, space: dict[str, Any], n: int, seed: int, jobs: int, name: str, progress: Progress,
               logger, runner=run_batch) -> tuple[list[str], list[dict[str, Any]]]:
    """Optuna's TPE over `space`: ask `jobs` points, run them as DVC experiments, tell it each
    one's metric (a failed point is a failed trial), until `n` points ran."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions = optuna_distributions(space)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    names: list[str] = []
    points: list[dict[str, Any]] = []
    params = read_params(repo / "params.yaml")
    while len(names) < n:
        trials = [study.ask(distributions) for _ in range(min(jobs, n - len(names)))]
        batch = [(f"{name}-{len(names) + i}", whole_lists(trial.params, params)) for i, trial in enumerate(trials, start=1)]
        for _, point in batch:
            check_overrides(repo / "params.yaml", point)
        runner(repo, batch, jobs, progress, logger)
        for trial, (exp, point) in zip(trials, batch):
            if exp in progress.metric:
                study.tell(trial, progress.metric[exp])
            else:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            names.append(exp)
            points.append(point)
    return names, points

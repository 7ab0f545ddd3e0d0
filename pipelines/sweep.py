"""Sweeps: a grid, a random or a Bayesian (Optuna's TPE) search over params, each point a queued
DVC experiment.

Points run through DVC's own queue (`dvc exp run --queue`, then `dvc queue start -j N`), each in its
own temporary workspace, so every point stays in `dvc exp show`, its outputs in DVC's cache, and any
one can be promoted with `dvc exp branch` / `dvc exp apply` (`cifar10-pipeline promote`).

Every sweep is an Optuna study named after it, kept in Optuna's storage (a journal file beside the
sweep's table, or the database `storage` names): a grid's or a random search's points are queued
in the study up front, a TPE search keeps `jobs` points in flight and asks the next as soon as one
ends, and each point's metric is told as it ends. Rerunning a sweep under its name resumes it:
ended trials are kept, and a trial the dead sweep left running is kept if its experiment ended well
meanwhile (DVC's queue runs on without the sweep), else stopped, marked failed and asked again, once.
Progress (done, failed, remaining, best so far) is logged as points finish, and on a terminal it
stays in a line at its foot, rewritten while points run. With a work pool
(`pool`), each point is instead a flow run of the pool's deployment (pipelines/pool.py), taken by
whichever workers serve it, and its experiment's ref is pulled from the git remote (its outputs stay
in the DVC remote until it is promoted).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TextIO

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import SecretStr

from pipelines.compare import safe_name
from pipelines.dvcrepo import dvc, dvc_environment, dvc_executable, set_arg
from pipelines.history import markdown, with_gaps
from pipelines.runs import experiment_commits, experiment_metrics, experiments_table, is_number
from pipelines.study import open_study, optuna_distributions, sample_points, search_of, study_storage
from stages.common.errors import CommandFailed
from stages.common.params import read_params, whole_lists
from stages.common.run_params import check_overrides
from stages.common.trial import PRUNED_AT, STORAGE_ENV, STUDY_DIR, TRIAL_KEY, pruner_of, study_journal

OUT_DIR = STUDY_DIR
# A point runs the stages its ranking metric needs; export and report run for the point promoted
# (pipelines/registry.py), not for every point.
POINT_UNTIL = "evaluate"


def _rounded(value: Any) -> Any:
    # Six significant digits keep a random draw's experiment params readable.
    return float(f"{value:.6g}") if isinstance(value, float) else value


def _override(key: str, value: Any) -> str:
    return set_arg(key, _rounded(value))


WIPE = "\r\x1b[K"  # back to the line's start, and clear it


class LiveLine:
    """A line at the foot of a terminal, rewritten in place; where the output is no terminal (a
    file, CI, a worker's log) it writes nothing. A log line its handlers print to the same
    terminal wipes it first, so the two never share a line; the next `show` puts it back."""

    def __init__(self, stream: TextIO | None = None, handlers: list[logging.Handler] | None = None) -> None:
        self.stream = stream or sys.stderr
        self.on = self.stream.isatty() and os.environ.get("TERM") != "dumb"
        self.handlers = handlers if handlers is not None else [
            handler for logger in (logging.getLogger("prefect"), logging.getLogger())
            for handler in logger.handlers if getattr(handler, "stream", None) is self.stream]
        self.shown = False

    def show(self, text: str) -> None:
        if self.on:  # a line longer than the terminal would wrap, and the wipe would reach only its end
            self.stream.write(WIPE + text[: shutil.get_terminal_size().columns - 1])
            self.stream.flush()
            self.shown = True

    def wipe(self, record: logging.LogRecord | None = None) -> bool:
        """Clear the line (a logging filter: it lets every record through)."""
        if self.shown:
            self.stream.write(WIPE)
            self.stream.flush()
            self.shown = False
        return True

    def __enter__(self) -> Self:
        for handler in self.handlers:
            handler.addFilter(self.wipe)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()
        for handler in self.handlers:
            handler.removeFilter(self.wipe)


RESULTS_RETRY_S = (2, 4, 8, 16, 30)


class Progress:
    """Which points ended, their metric, and one log line per change: done/failed/remaining, best
    so far; while points run, the same with those running and waiting and the time taken, on the
    terminal's live line."""

    def __init__(self, repo: Path, total: int, sort_by: str, logger, live: LiveLine | None = None) -> None:
        self.repo, self.total, self.sort_by, self.logger, self.live = repo, total, sort_by, logger, live
        self.started = time.monotonic()
        self.metric: dict[str, float] = {}
        self.failed: list[str] = []
        self.pruned: dict[str, int] = {}  # experiment: the epoch its pruner stopped it after (the study tells)
        self.on_ended: Callable[[set[str]], None] = lambda names: None  # the study hears of each as it ends

    def results(self) -> pd.DataFrame:
        # `dvc exp show` fails while DVC's queue saves a point (its lock, its refs) and while it sets
        # up or cleans up a point's workspace (the point's infofile not written yet, or gone; longer
        # on a busy machine): look again, for about a minute in all.
        for wait_s in RESULTS_RETRY_S:
            try:
                return experiments_table(self.repo, sort_by=None)
            except CommandFailed as err:
                self.logger.warning(f"reading the points' results failed ({err}); trying again in {wait_s} s")
                time.sleep(wait_s)
        return experiments_table(self.repo, sort_by=None)

    def ended(self, names: set[str]) -> None:
        # Each ended point's own commit, read with git: `dvc exp show` reads every experiment, and
        # would cost more with each point a sweep adds.
        metrics = experiment_metrics(self.repo, names)
        for exp in sorted(names):
            found = metrics.get(exp, {})
            value = found.get(self.sort_by)
            if is_number(value) and math.isfinite(value):
                self.metric[exp] = float(value)
            elif is_number(found.get(PRUNED_AT)):
                self.pruned[exp] = int(found[PRUNED_AT])  # evaluate does not evaluate a pruned model
            else:
                self.failed.append(exp)
        self.on_ended(names)
        self.logger.info(self.line())

    def best(self) -> str | None:
        """The finished point with the best metric; a pruned one never counts."""
        finished = {exp: value for exp, value in self.metric.items() if exp not in self.pruned}
        return max(finished, key=finished.get) if finished else None

    def ended_count(self) -> int:
        return len(self.metric.keys() | self.pruned.keys()) + len(self.failed)

    def ended_so_far(self) -> str:
        done = self.ended_count()
        pruned = f" ({len(self.pruned)} pruned)" if self.pruned else ""
        return f"{done}/{self.total} ended{pruned}, {len(self.failed)} failed"

    def best_so_far(self) -> str:
        best = self.best()
        return f"best so far {best} ({self.sort_by} {self.metric[best]})" if best else "no point finished yet"

    def line(self) -> str:
        remaining = self.total - self.ended_count()
        return f"progress: {self.ended_so_far()}, {remaining} remaining; {self.best_so_far()}"

    def poll(self, running: int, waiting: int) -> None:
        """What the points in flight are doing, looked at now: to the live line, what changes most first."""
        if self.live is not None:
            minutes, seconds = divmod(int(time.monotonic() - self.started), 60)
            self.live.show(f"progress: {self.ended_so_far()}; {running} running, {waiting} waiting; "
                           f"{minutes}:{seconds:02d}; {self.best_so_far()}")


POLL_S = 5.0  # how often the points in flight are looked at
LOOK_MAX_S = 30.0  # the longest a local sweep takes to notice a failed point
# DVC's queue calls a point running from when a worker takes it; more points running than workers
# busy this long means one is run by nobody (a worker that stopped for an empty queue as it took it).
UNSERVED_S = 30.0


def queue_state(repo: Path) -> tuple[dict[str, str] | None, int, int]:
    """{experiment name: Queued | Running | Success | Failed} and how many queue workers are up and
    how many of those run a point, from `dvc queue status`; None for the first when it could not be read."""
    import subprocess

    done = subprocess.run([dvc_executable(), "queue", "status"], cwd=repo, env=dvc_environment(), capture_output=True,
                          text=True)
    if done.returncode != 0:
        return None, 0, 0
    rows = [line.split() for line in done.stdout.splitlines()[1:] if not line.startswith("Worker status:")]
    workers = re.search(r"Worker status: (\d+) active, (\d+) idle", done.stdout)
    active, idle = (int(workers[1]), int(workers[2])) if workers else (0, 0)
    return {row[1]: row[-1] for row in rows if len(row) >= 4}, active + idle, active


def queue_statuses(repo: Path) -> dict[str, str]:
    return queue_state(repo)[0] or {}


def leave_queue(repo: Path, exp: str, status: str | None) -> None:
    """Take a point out of DVC's queue: stopped if it runs (a task that ended meanwhile cannot be
    killed), then removed; a killed task stays listed as failed until removed once more."""
    with contextlib.suppress(CommandFailed):
        if status == "Running":
            dvc(repo, "queue", "kill", "--force", exp)
    for _ in range(3):
        if status not in ("Queued", "Running", "Failed"):
            return
        with contextlib.suppress(CommandFailed):
            dvc(repo, "queue", "remove", exp)
        status = queue_statuses(repo).get(exp)


def run_began(repo: Path, exp: str) -> bool:
    """Whether a queued point's run began: DVC has its output log from then on."""
    try:
        dvc(repo, "queue", "logs", exp)
    except CommandFailed:
        return False
    return True


class LocalQueue:
    """Points as DVC's queued experiments (`dvc exp run --queue`), run by `jobs` of its queue
    workers (`dvc queue start`), each in its own temporary workspace. Points may be queued while
    others run: a worker takes the next as soon as it is free."""

    def __init__(self, repo: Path, jobs: int, logger, study_env: dict[str, str] | None = None) -> None:
        self.repo, self.jobs, self.logger = repo, jobs, logger
        self.env = {**dvc_environment(), **(study_env or {})}  # where the points' training finds the study
        self.pending: set[str] = set()
        self.before: dict[str, str | None] = {}  # each point's experiment commit when it was queued: none, normally
        self.sets: dict[str, list[str]] = {}  # each point's `-S` overrides, to queue it again if DVC loses it
        self.unserved: dict[str, float] = {}  # points called running beyond the busy workers, since when
        self.on_poll: Callable[[int, int], None] = lambda running, waiting: None
        self._own_workers()

    def _own_workers(self, timeout_s: float = 60) -> None:
        # A worker keeps the environment of the process that started it (the study its points
        # report to, the process their stages watch): one another sweep left idle is stopped.
        deadline = time.monotonic() + timeout_s
        while queue_state(self.repo)[1] and time.monotonic() < deadline:  # any worker, busy or idle
            with contextlib.suppress(CommandFailed):
                dvc(self.repo, "queue", "stop")
            time.sleep(1)

    def _start_workers(self) -> None:
        import subprocess

        # To a file, not a pipe: the workers it starts would hold a pipe open, and this would wait for them to end.
        with tempfile.TemporaryFile() as said:
            done = subprocess.run([dvc_executable(), "queue", "start", "--jobs", str(self.jobs)], cwd=self.repo,
                                  env=self.env, stdout=said, stderr=said)
            if done.returncode:
                said.seek(0)
                raise CommandFailed(f"dvc queue start: {said.read().decode(errors='replace').strip()}")

    def submit(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        committed = experiment_commits(self.repo)
        for exp, point in batch:
            self.sets[exp] = [arg for key, value in point.items() for arg in ("-S", _override(key, value))]
            self._queue(exp)
            self.logger.info(f"queued {exp}: {point}")
            self.pending.add(exp)
            self.before[exp] = committed.get(exp)
        self._start_workers()

    def _queue(self, exp: str) -> None:
        dvc(self.repo, "exp", "run", "--queue", "--name", exp, *self.sets[exp], POINT_UNTIL)

    def _unserved(self, statuses: dict[str, str], busy: int, now: float) -> set[str]:
        """Points DVC's queue has called running for UNSERVED_S while fewer workers were busy. A
        worker that stops for an empty queue just as a point is queued takes it and runs nothing,
        and DVC calls it running for good: such a point, whose run never began, is queued again.
        With no worker busy, one whose run began has lost its worker: it is stopped and returned,
        to end as failed (a rerun of the sweep asks it again)."""
        running = [exp for exp in self.pending if statuses.get(exp) == "Running"]
        self.unserved = {exp: self.unserved.get(exp, now) for exp in (running if len(running) > busy else [])}
        ended = set()
        for exp in [exp for exp, since in self.unserved.items() if now - since >= UNSERVED_S]:
            began = run_began(self.repo, exp)
            if began and busy:
                continue  # perhaps the one a busy worker runs
            del self.unserved[exp]
            leave_queue(self.repo, exp, "Running")
            if began:
                self.logger.error(f"{exp}: no worker of DVC's queue runs it any more; stopped, it ends as failed")
                ended.add(exp)
            else:
                self.logger.warning(f"{exp}: DVC's queue dropped it unrun (its worker stopped as it took it); "
                                    "queued again")
                self._queue(exp)
        return ended

    def _committed(self) -> set[str]:
        """Points in flight whose experiment is committed (a ref new since it was queued)."""
        committed = experiment_commits(self.repo)
        return {exp for exp in self.pending if committed.get(exp) not in (None, self.before.get(exp))}

    def wait(self) -> set[str]:
        """Block until at least one queued point ended; those that did. What ended, failed, runs
        and whether a worker is up, DVC's queue tells (`dvc queue status`: about a second of CPU),
        asked every 5 s at first, then every quarter of the time waited so far, at most every
        LOOK_MAX_S; and at once when a point's experiment shows in git, as one that ended well
        does (until the queue has let go of it, it is not taken for ended: DVC still saves it)."""
        started, next_look, counts = time.monotonic(), 0.0, None
        while self.pending:
            now = time.monotonic()
            ended: set[str] = set()
            if now >= next_look or self._committed():
                next_look = now + min(max(POLL_S, (now - started) / 4), LOOK_MAX_S)
                statuses, workers, busy = queue_state(self.repo)
                if statuses is not None:  # None: unreadable this time (DVC's lock), looked at again next time
                    # Out of the queue (removed by hand) is ended too: `progress.ended` finds no experiment.
                    ended = {exp for exp in self.pending if statuses.get(exp) not in ("Queued", "Running")}
                    ended |= self._unserved(statuses, busy, now)
                    counts = (sum(statuses.get(exp) == "Running" for exp in self.pending),
                              sum(statuses.get(exp) == "Queued" for exp in self.pending))
                    if not ended and not workers:  # an idle worker stops itself after a few seconds
                        self._start_workers()
            if counts is not None:
                self.on_poll(*counts)
            if ended:
                self.pending -= ended
                return ended
            time.sleep(POLL_S)
        return set()


class PoolRunner:
    """Points as flow runs of the pool's deployment, taken by however many workers serve the pool;
    each finished point's experiment is pulled from origin. A point origin already holds (this
    sweep ran before) is pulled, not run again: rerunning a sweep retries its failed points alone."""

    def __init__(self, repo: Path, logger, *, pool: str, git_url: str, rev: str, sweep_name: str,
                 gpu_pool: str | None = None, study_env: dict[str, str] | None = None) -> None:
        from pipelines import pool as work_pool

        self.repo, self.logger, self.pool, self.git_url, self.rev = repo, logger, pool, git_url, rev
        self.sweep_name, self.gpu_pool, self.storage = sweep_name, gpu_pool, (study_env or {}).get(STORAGE_ENV)
        self.on_origin = work_pool.pushed_experiments(repo)
        self.runs: dict[str, Any] = {}
        self.ended_already: set[str] = set()
        self.on_poll: Callable[[int, int], None] = lambda running, waiting: None

    def submit(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        from pipelines import pool as work_pool

        for exp in (exp for exp, _ in batch if exp in self.on_origin):
            work_pool.pull_experiment(self.repo, exp, outputs=False)
            self.logger.info(f"{exp} is already on origin (an earlier run of this sweep): pulled, not run again")
            self.ended_already.add(exp)
        todo = {exp: {k: _rounded(v) for k, v in point.items()} for exp, point in batch if exp not in self.on_origin}
        runs = work_pool.submit(self.pool, self.git_url, self.rev, todo, tags=[f"sweep:{self.sweep_name}"],
                                gpu_pool=self.gpu_pool, study_storage=self.storage, until=POINT_UNTIL)
        for exp, run in runs.items():
            self.logger.info(f"submitted {exp} to work pool '{self.pool}' (flow run {run.id}): {todo[exp]}")
        self.runs.update(runs)

    def wait(self) -> set[str]:
        """Block until at least one submitted point ended; those that did, pulled when they finished."""
        from pipelines import pool as work_pool

        if self.ended_already:
            ended, self.ended_already = self.ended_already, set()
            return ended

        def polled(states: dict[str, Any]) -> None:
            running = sum(state.is_running() for state in states.values())
            self.on_poll(running, sum(not state.is_final() for state in states.values()) - running)

        final = work_pool.wait_for(self.runs, POLL_S, any_of=True, on_poll=polled)
        for exp, state in final.items():
            del self.runs[exp]
            if state.is_completed():
                work_pool.pull_experiment(self.repo, exp, outputs=False)
            else:
                self.logger.error(f"{exp}: flow run {state.name} ({state.message}); rerunning the sweep asks it once more")
        return set(final)


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
    storage: SecretStr | None = None,  # a database URL may hold a password: the API shows it masked
    pruner: str | dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Queue one DVC experiment per point, run them (`jobs` at a time, or as flow runs on the
    work pool `pool`, each sending its GPU stages to `gpu_pool` when given), then rank them; a
    sweep run before under `name` resumes. With a `pruner`, each point's training reports to its
    trial and stops when the pruner says so."""
    logger = get_run_logger()
    repo = Path(repo_dir).resolve()
    pruner_of(pruner)  # a bad pruner or space fails before anything runs
    if kind == "tpe":
        optuna_distributions(space or {})
        points = []
    else:
        params = read_params(repo / "params.yaml")
        points = [whole_lists(point, params) for point in sample_points(space or {}, kind, n, seed)]
    for point in points:  # a point the schema refuses would only fail later, in its own run
        check_overrides(repo / "params.yaml", point)
    name = safe_name(name or time.strftime("sweep-%Y%m%d-%H%M%S"))
    if pool:
        from pipelines import pool as work_pool

        for target in filter(None, (pool, gpu_pool)):  # before anything is submitted
            git_url, rev, deployment = work_pool.deploy_head(repo, target)
            logger.info(f"deployment {deployment}: workers clone {git_url} at {rev[:7]}")
    url = storage.get_secret_value() if storage else None
    # Where the points' train stage finds the study: pool workers clone elsewhere, so it is always named.
    study_env = {STORAGE_ENV: url or str(study_journal(repo, name))} if pruner else {}
    total = n if kind == "tpe" else len(points)
    live = LiveLine()
    progress = Progress(repo, total, sort_by, logger, live)
    search = search_of(kind, space or {}, seed, total, pruner)
    study = open_study(study_storage(repo, name, url), name, search, points)
    resumed = recover(repo, study, kind, progress, pool)
    if resumed:
        logger.info(f"resuming sweep {name}: {resumed}")
    runner = (PoolRunner(repo, logger, pool=pool, git_url=git_url, rev=rev, sweep_name=name, gpu_pool=gpu_pool,
                         study_env=study_env) if pool else LocalQueue(repo, jobs, logger, study_env))
    started = time.perf_counter()
    with live:
        run_trials(repo, study, kind, space or {}, total, jobs, name, progress, logger, runner,
                   prune=pruner is not None)
    where = f"on work pool '{pool}'" if pool else f"with {jobs} job(s)"
    logger.info(f"sweep {name}: {total} points ended, after {time.perf_counter() - started:.0f} s here {where}")
    names, points = ended_points(repo, study, kind)

    result = ranked(progress.results(), names, points, progress)
    failed = result.loc[result["status"] == "failed", "name"].tolist() if not result.empty else []
    points_by_name = dict(zip(names, points))
    rerun = f"--name {name}" + (f" --pool {pool}" if pool else "")
    for n_ in failed:
        logger.error(f"{n_} failed: {points_by_name[n_]}; rerunning the sweep with {rerun} asks a failed point once more")
    best = result.iloc[0].to_dict() if not result.empty and result.iloc[0]["status"] == "ok" else None

    out = repo / OUT_DIR
    out.mkdir(exist_ok=True)
    result.to_csv(out / f"{name}.csv", index=False)
    write_page(repo, out / f"{name}.html", study, kind, space or {}, result, progress)
    pruned = f", {len(progress.pruned)} pruned" if pruner else ""
    summary = [f"# Sweep {name}", "", f"{len(points)} points ({kind}){pruned}, {len(failed)} failed.", "",
               markdown(result)]
    if best:
        summary += ["", (f"Best: `{best['name']}` accuracy {best.get('accuracy')}; "
                        f"promote it with `cifar10-pipeline promote {best['name']} --branch {best['name']}`")]
    summary += ["", f"Curves, importances and parallel coordinates: {out / f'{name}.html'}"]
    (out / f"{name}.md").write_text("\n".join(summary) + "\n")
    create_table_artifact(with_gaps(result).to_dict("records"),
                          key=safe_name(f"sweep-{name}").lower(), description=f"Sweep {name}")
    create_markdown_artifact("\n".join(summary), key="cifar10-sweep", description="Latest sweep")
    return {"name": name, "points": len(points), "failed": failed, "best": best, "table": str(out / f"{name}.csv")}


def write_page(repo: Path, page: Path, study: Any, kind: str, space: dict[str, Any], result: pd.DataFrame,
               progress: Progress) -> None:
    """The sweep's page (pipelines/sweep_page.py) beside its table."""
    from pipelines import sweep_page
    from stages.common import dataio

    drawn = {t.user_attrs["experiment"]: t.params if kind == "tpe" else t.user_attrs["point"] for t in _ended(study)}
    finished = {exp: progress.metric[exp] for exp in result.loc[result["status"] == "ok", "name"]} if len(result) else {}
    keys = [c for c in result.columns if c not in ("name", "status", PRUNED_AT, "accuracy", "f1_macro", "loss",
                                                   progress.sort_by)]
    found = sweep_page.importances(drawn, finished, space)
    per_point = sweep_page.curves(repo, list(result["name"])) if len(result) else {}
    dataio.write_text(page, sweep_page.render(page.stem, result, keys, progress.sort_by, per_point, found))


def ranked(table: pd.DataFrame, names: list[str], points: list[dict[str, Any]], progress: Progress) -> pd.DataFrame:
    """One row per ended point: its values, metrics and status. Finished points come first, best
    metric first; then the pruned (never ranked among the finished; those that trained longest first),
    then the failed."""
    rows_by_name = {row["name"]: row for row in table.to_dict("records")} if not table.empty else {}
    metrics = list(dict.fromkeys([progress.sort_by, "accuracy", "f1_macro", "loss"]))
    rows = []
    for exp, point in zip(names, points):
        row = rows_by_name.get(exp)
        status = ("failed" if row is None else "pruned" if exp in progress.pruned
                  else "ok" if exp in progress.metric else "failed")
        rows.append({"name": exp, **point, **({k: row.get(k) for k in metrics} if status != "failed" else {}),
                     "status": status, **({PRUNED_AT: progress.pruned[exp]} if status == "pruned" else {})})
    result = pd.DataFrame(rows)
    if result.empty:
        return result
    if PRUNED_AT in result:
        result[PRUNED_AT] = result[PRUNED_AT].astype("Int64")  # an epoch count, blank where not pruned
    order = result["status"].map({"ok": 0, "pruned": 1, "failed": 2})
    value = pd.to_numeric(result.get(progress.sort_by, pd.Series(index=result.index, dtype=float)), errors="coerce")
    reached = result[PRUNED_AT] if PRUNED_AT in result else pd.Series(index=result.index, dtype="Int64")
    return (result.assign(_order=order, _value=value, _reached=reached)
            .sort_values(["_order", "_reached", "_value"], ascending=[True, False, False], na_position="last",
                         kind="stable")
            .drop(columns=["_order", "_value", "_reached"]).reset_index(drop=True))


def _died(study: Any) -> set[int]:
    return set(study.user_attrs.get("died", []))


def _ended(study: Any) -> list[Any]:
    """The study's trials that ran to an end, in the order they were asked."""
    from optuna.trial import TrialState

    died = _died(study)
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL))
            if t.number not in died and "experiment" in t.user_attrs]


def recover(repo: Path, study: Any, kind: str, progress: Progress, pool: str | None) -> str:
    """Pick up where an earlier run of the sweep left its study. A trial it left running (it died)
    is told its experiment's metric when that ended well meanwhile, and is otherwise stopped and
    failed; each failed trial is asked again, once. Ended trials count towards `n` as before.
    Returns what it found, empty for a new sweep."""
    from optuna.trial import TrialState

    left = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    statuses = queue_statuses(repo) if left and not pool else {}
    if left and pool:
        from pipelines import pool as work_pool

        pushed = work_pool.pushed_experiments(repo)
        for exp in (trial.user_attrs.get("experiment") for trial in left):
            if exp in pushed:
                work_pool.pull_experiment(repo, exp, outputs=False)
                statuses[exp] = "Success"
    kept = [exp for trial in left if (exp := _ended_meanwhile(repo, study, trial, progress, statuses))]
    retried = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.number in _died(study) or "retry_of" in trial.user_attrs:
            continue  # asked again already, or a retry that failed for good
        study.set_user_attr("died", sorted(_died(study) | {trial.number}))
        point = {k: v for k, v in trial.user_attrs.items() if k != "experiment"}
        study.enqueue_trial(trial.params if kind == "tpe" else {}, user_attrs={**point, "retry_of": trial.number})
        retried.append(trial.user_attrs.get("experiment", f"trial {trial.number}"))
    ended = _ended(study)
    progress.metric.clear()
    progress.failed.clear()
    progress.pruned.clear()
    for trial in ended:
        exp = trial.user_attrs["experiment"]
        if trial.state == TrialState.FAIL:
            progress.failed.append(exp)
            continue
        if trial.state == TrialState.PRUNED:
            progress.pruned[exp] = trial.user_attrs[PRUNED_AT]
        else:
            progress.metric[exp] = trial.value
    if not (ended or left or retried):
        return ""
    return (f"{len(ended)} points had ended; {len(left)} were left running ({', '.join(kept) or 'none'} ended well "
            f"meanwhile); asked again: {', '.join(retried) or 'none'}")


def _ended_meanwhile(repo: Path, study: Any, trial: Any, progress: Progress, statuses: dict[str, str]) -> str | None:
    """A trial a dead sweep left running: told its metric when its experiment ended well without
    the sweep (DVC's queue, a pool's workers, run on), else stopped and failed."""
    from optuna.trial import TrialState

    exp = trial.user_attrs.get("experiment", "")
    if statuses.get(exp) == "Success":
        progress.on_ended = functools.partial(tell_ended, study, {exp: trial}, progress)
        progress.ended({exp})
        if exp in progress.metric.keys() | progress.pruned.keys():
            return exp
    leave_queue(repo, exp, statuses.get(exp))  # or it would run beside its retry
    study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
    return None


def run_trials(repo: Path, study: Any, kind: str, space: dict[str, Any], n: int, jobs: int, name: str,
               progress: Progress, logger, runner: LocalQueue | PoolRunner, prune: bool = False) -> None:
    """Ask the study for points until `n` trials ended, run each as a DVC experiment, and tell each
    one's metric as it ends (a failed point is a failed trial, a point its training pruned a pruned
    one). A grid's or random search's queued points all go to the runner at once; TPE keeps `jobs`
    trials in flight, asking the next as soon as one ends (Optuna's constant liar keeps those in
    flight apart). With `prune`, each point's training reports to its trial (train.trial)."""
    from optuna.trial import TrialState

    distributions = optuna_distributions(space) if kind == "tpe" else {}
    params = read_params(repo / "params.yaml")
    asked: dict[str, Any] = {}  # experiment: its trial
    running: set[str] = set()
    progress.on_ended = functools.partial(tell_ended, study, asked, progress)
    runner.on_poll = progress.poll
    while True:
        todo = n - len(_ended(study)) - len(running)
        if kind == "tpe":
            todo = min(todo, jobs - len(running))
        else:
            todo = min(todo, len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,))))
        if todo > 0:
            batch = ask(study, kind, distributions, params, name, todo, prune, asked)
            for _, point in batch if kind == "tpe" else ():  # a grid's or random search's were checked up front
                check_overrides(repo / "params.yaml", point)
            runner.submit(batch)
            running |= {exp for exp, _ in batch}
        if not running:
            return
        ended = runner.wait()
        running -= ended
        progress.ended(ended)


def ask(study: Any, kind: str, distributions: dict[str, Any], params: dict[str, Any], name: str, count: int,
        prune: bool, asked: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """`count` new trials, each named after its experiment and added to `asked`: (experiment, point)."""
    batch = []
    for _ in range(count):
        trial = study.ask(distributions)
        exp = f"{name}-{trial.number + 1}"
        trial.set_user_attr("experiment", exp)
        point = whole_lists(trial.params if kind == "tpe" else trial.user_attrs["point"], params)
        batch.append((exp, {**point, TRIAL_KEY: f"{name}/{trial.number}"} if prune else point))
        asked[exp] = trial
    return batch


def tell_ended(study: Any, trials: dict[str, Any], progress: Progress, names: set[str]) -> None:
    """Tell the study the metric of each named point that ended: a failed one is a failed trial,
    one its training pruned (its trial records where) a pruned trial, valued at its last report."""
    from optuna.trial import TrialState

    for exp in names & set(trials):
        number = trials[exp].number
        frozen = study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))
        if frozen.state.is_finished():
            continue
        if exp not in progress.metric.keys() | progress.pruned.keys():
            study.tell(number, state=TrialState.FAIL)
        elif exp in progress.pruned or PRUNED_AT in frozen.user_attrs:
            progress.pruned[exp] = frozen.user_attrs.get(PRUNED_AT, progress.pruned.get(exp))
            study.tell(number, state=TrialState.PRUNED)
        else:
            study.tell(number, progress.metric[exp])


def ended_points(repo: Path, study: Any, kind: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The experiments of the study's ended trials and their points, as they were run."""
    params = read_params(repo / "params.yaml")
    ended = _ended(study)
    return ([t.user_attrs["experiment"] for t in ended],
            [whole_lists(t.params if kind == "tpe" else t.user_attrs["point"], params) for t in ended])

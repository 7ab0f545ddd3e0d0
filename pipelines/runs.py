"""Runs to compare: a commit, branch, tag, DVC experiment or the workspace, read from git and
DVC, their metrics, report and predictions checked as they are read; and every run at once
(`dvc exp show`) as one table."""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.dvcrepo import dvc, git
from stages.common.errors import ConfigError, DataError
from stages.common.params import flatten
from stages.common.paths import evaluation_files
from stages.common.trial import PRUNED_AT

WORKSPACE = "workspace"
# Where main's runs are: origin's first (a CI checkout has no local main), then the clone's own.
UPSTREAM_MAIN = ("origin/main", "main", "origin/master", "master")


def resolve(repo: Path, rev: str | None) -> str | None:
    """A commit sha for a git revision or an experiment name; None for the workspace."""
    if rev in (None, WORKSPACE):
        return None
    found = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found:
        return found
    found = experiment_commit(repo, rev)
    if found:
        return found
    raise ConfigError(f"'{rev}' is neither a git revision nor a DVC experiment here; see `git log` and `dvc exp show`")


def experiment_commit(repo: Path, name: str) -> str | None:
    """The commit of the DVC experiment named `name` (its ref under refs/exps); None when there is none."""
    return experiment_commits(repo).get(name)


def experiment_refs(repo: Path) -> list[tuple[str, str, str]]:
    """(name, baseline, commit) of each DVC experiment here, from its ref: git alone, so DVC's lock
    and its queue's workspaces never get in the way. Not DVC's own bookkeeping (queues, executors)."""
    from dvc.repo.experiments.exceptions import InvalidExpRefError
    from dvc.repo.experiments.refs import ExpRefInfo

    found = []
    for line in (git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps") or "").splitlines():
        sha, ref = line.split(" ", 1)
        try:
            info = ExpRefInfo.from_ref(ref)
        except InvalidExpRefError:
            continue
        if info.name and re.fullmatch(r"[0-9a-f]{40}", info.baseline_sha or ""):
            found.append((info.name, info.baseline_sha, sha))
    return found


def experiment_commits(repo: Path) -> dict[str, str]:
    """{name: commit} of DVC's experiments; a name used on several baselines is HEAD's experiment,
    where HEAD has one of that name."""
    head = git(repo, "rev-parse", "--verify", "--quiet", "HEAD")
    return {name: sha for name, _, sha in sorted(experiment_refs(repo), key=lambda ref: ref[1] == head)}


def experiment_metrics(repo: Path, names: set[str]) -> dict[str, dict[str, Any]]:
    """What evaluate wrote (its metrics file) in each named experiment's commit; a name without an
    experiment (it failed, or never ran) or whose experiment holds no readable metrics is left out."""
    path, commits = evaluation_files(repo)["metrics"], experiment_commits(repo)
    found = {}
    for name in names & set(commits):
        try:
            metrics = _parse_json(read_at(repo, path, commits[name]) or "null", f"{path} of '{name}'")
        except BrokenResult:
            continue
        if isinstance(metrics, dict):
            found[name] = metrics
    return found


def lower_is_better(metric: str) -> bool:
    """How runs rank by a metric: a loss falls as a run gets better, anything else rises."""
    return "loss" in metric


def main_branch(repo: Path) -> str | None:
    """The user's own main before origin's: what a person looks at here, their unpushed runs included."""
    for ref in sorted(UPSTREAM_MAIN, key=lambda ref: ref.startswith("origin/")):
        if git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"):
            return ref
    return None


def read_at(repo: Path, path: str, sha: str | None) -> str | None:
    """The file's text at a commit (None = workspace); None where the run has no such file."""
    if sha is None:
        file = repo / path
        return file.read_text() if file.is_file() else None
    return git(repo, "show", f"{sha}:{path}")


@dataclass
class Run:
    name: str
    sha: str | None
    metrics: dict[str, Any]
    report: dict[str, Any]
    confusion: pd.DataFrame | None
    predictions: pd.DataFrame | None


def check_comparable(a: Run, b: Run) -> list[str]:
    """Refuse runs evaluated on different splits or data; note what cannot be checked."""
    split_a, split_b = a.metrics.get("split"), b.metrics.get("split")
    if split_a and split_b and split_a != split_b:
        raise ConfigError(f"{a.name} was evaluated on the {split_a} split and {b.name} on the {split_b} split; "
                         "compare runs evaluated on the same split (evaluate.split)")
    data_a, data_b = a.metrics.get("data"), b.metrics.get("data")
    if data_a and data_b and data_a != data_b:
        raise ConfigError(f"{a.name} and {b.name} were evaluated on different images (data {data_a} vs {data_b}); "
                         "compare runs on the same prepared data")
    unknown = [run.name for run in (a, b) if not run.metrics.get("split")]
    return [f"{', '.join(unknown)} does not record its evaluated split (evaluated before it was recorded)"] \
        if unknown else []


class BrokenResult(DataError):
    """A result file read back (metrics, report, confusion matrix, predictions) that is not what
    evaluate writes: edited by hand, truncated, or merged badly."""


def is_number(value: Any) -> bool:
    """A JSON number: not a bool, which Python counts as one."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise BrokenResult(f"{where} is not valid JSON ({err}); restore it (`git checkout` it, or rerun "
                           "`dvc repro -f evaluate`)") from None


def parse_metrics(text: str, where: str) -> dict[str, Any]:
    metrics = _parse_json(text, where)
    if isinstance(metrics, dict) and (pruned_after := metrics.get(PRUNED_AT)):
        raise ConfigError(f"{where} holds no test figures: its sweep's pruner stopped its training after epoch "
                          f"{pruned_after}; name a run that trained to its end")
    if not isinstance(metrics, dict) or not is_number(metrics.get("accuracy")):
        raise BrokenResult(f"{where} has no numeric 'accuracy' (it holds {str(metrics)[:80]}); restore it "
                           "(`git checkout` it, or rerun `dvc repro -f evaluate`)")
    return metrics


def parse_report(text: str, where: str) -> dict[str, Any]:
    report = _parse_json(text, where)
    rows = [row for name, row in report.items() if name != "accuracy"] if isinstance(report, dict) else None
    if rows is None or not all(isinstance(row, dict) and all(is_number(row.get(k)) for k in ("precision", "recall",
                                                                                       "f1-score")) for row in rows):
        raise BrokenResult(f"{where} is not a classification report (one row of precision, recall and f1-score per "
                           "class); restore it (`git checkout` it, or rerun `dvc repro -f evaluate`)")
    return report


def parse_table(text: str, where: str, columns: tuple[str, ...] = (), sep: str = ",") -> pd.DataFrame:
    """A CSV (or TSV) table with the given columns or, without them, a matrix of counts (row labels first)."""
    try:
        table = pd.read_csv(io.StringIO(text), index_col=None if columns else 0, sep=sep)
    except (ValueError, pd.errors.ParserError) as err:
        raise BrokenResult(f"{where} is not a CSV table ({str(err).splitlines()[0]}); restore it") from None
    if columns:
        broken = [c for c in columns if c not in table.columns]
    else:
        broken = [str(c) for c, dtype in table.dtypes.items() if not pd.api.types.is_numeric_dtype(dtype)]
    if broken or table.empty:
        what = f"column(s) {', '.join(broken)}" if columns else f"counts in column(s) {', '.join(broken) or 'any'}"
        raise BrokenResult(f"{where} lacks {what}; restore it (`git checkout` it, or rerun `dvc repro -f evaluate`)")
    return table


def curve_plots(repo: Path) -> dict[str, list[tuple[str, str]]]:
    """dvc.yaml's per-epoch plots: {title: [(TSV path, column), ...]}, paths filled in from `paths`."""
    import re

    import yaml

    from stages.common.paths import DVC_YAML, artifact_paths

    paths = {name: path.as_posix() for name, path in artifact_paths(repo).items()}
    plots = (yaml.safe_load((repo / DVC_YAML).read_text()) or {}).get("plots") or []
    curves = {}
    for entry in plots:
        for title, spec in (entry.items() if isinstance(entry, dict) else ()):
            if isinstance(spec, dict) and spec.get("x") == "step" and isinstance(spec.get("y"), dict):
                curves[title] = [(re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], file), column)
                                 for file, column in spec["y"].items()]
    return curves


def load_curves(repo: Path, sha: str | None) -> dict[str, list[tuple[str, pd.DataFrame]]]:
    """Each declared curve of a run as (its file, a step/value frame); a file the run lacks is left out."""
    found = {}
    for title, files in curve_plots(repo).items():
        frames = []
        for file, column in files:
            text = read_at(repo, file, sha)
            if text is not None:
                frame = parse_table(text, file, ("step", column), sep="\t")
                frames.append((file, frame[["step", column]].rename(columns={column: "value"})))
        if frames:
            found[title] = frames
    return found


def load_run(repo: Path, name: str) -> Run:
    sha = resolve(repo, name)
    files = evaluation_files(repo)
    text = {what: read_at(repo, path, sha) for what, path in files.items()}
    if text["metrics"] is None:
        raise ConfigError(f"'{name}' has no {files['metrics']}; pick a commit or experiment where evaluate ran")
    where = {what: f"{path} of '{name}'" for what, path in files.items()}
    return Run(
        name, sha, parse_metrics(text["metrics"], where["metrics"]),
        parse_report(text["report"], where["report"]) if text["report"] else {},
        parse_table(text["confusion"], where["confusion"]) if text["confusion"] else None,
        parse_table(text["predictions"], where["predictions"], ("actual", "predicted")) if text["predictions"] else None,
    )


@dataclass
class ShownRun:
    """One row of `dvc exp show -A`: a commit, one of its experiments, or the workspace."""

    name: str  # DVC's: a branch or tag at the commit, the experiment's name, else the short sha
    rev: str  # the full sha, or "workspace"
    kind: str  # "commit", "experiment" or "workspace"
    baseline: str | None  # an experiment's commit (full sha)
    timestamp: str | None
    params: dict[str, Any]  # params.yaml, flattened to dotted keys
    metrics: dict[str, Any]  # evaluate's metrics.json
    failed: bool
    recorded: bool  # a run of its own: an experiment, the workspace, or a commit that changed the run's files


def run_record(repo: Path) -> tuple[str, str]:
    """The files a run changes: a commit that changed one of them holds a run (two runs can score the same)."""
    return evaluation_files(repo)["metrics"], "dvc.lock"


def run_commits(repo: Path) -> list[str]:
    """Commits holding a run, on any branch, tag or remote branch, newest first."""
    return (git(repo, "log", "--branches", "--tags", "--remotes", "--format=%H", "--", *run_record(repo)) or "").split()


def experiment_baselines(repo: Path) -> list[str]:
    """The commits DVC's experiments branched from (their refs name them)."""
    return list(dict.fromkeys(baseline for _, baseline, _ in experiment_refs(repo)))


def shown_runs(repo: Path) -> list[ShownRun]:
    """The commits that hold runs, each experiment and the workspace, as `dvc exp show` lists them;
    also the experiments' baselines, main's tip and HEAD (others' params differ from theirs), with
    `recorded` false where such a commit holds no run of its own. Not `-A`: that reads dvc.yaml at
    every commit of the history, runs or not, and takes minutes on a long one."""
    commits = run_commits(repo)
    tips = [git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}") for ref in (main_branch(repo), "HEAD")
            if ref]
    revs = list(dict.fromkeys([*commits, *experiment_baselines(repo), *[t for t in tips if t]]))
    shown = json.loads(dvc(repo, "exp", "show", "--json", *[arg for rev in revs for arg in ("--rev", rev)])
                       or "[]") if revs else []
    metrics_file = evaluation_files(repo)["metrics"]
    recorded = {WORKSPACE, *commits}

    def run(entry: dict, kind: str, baseline: str | None) -> ShownRun:
        data = entry.get("data") or {}
        rev = data.get("rev") or entry.get("rev", "")
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        return ShownRun(
            # "workspace" is DVC's name for the working tree, not a commit hash to shorten.
            entry.get("name") or (rev if rev == WORKSPACE else rev[:7]), rev,
            WORKSPACE if rev == WORKSPACE else kind, baseline, data.get("timestamp"), flatten(params),
            ((data.get("metrics") or {}).get(metrics_file) or {}).get("data") or {},
            bool(entry.get("error")) or data.get("status") == "Failed", kind != "commit" or rev in recorded)

    runs = []
    for entry in shown:
        commit = run(entry, "commit", None)
        runs.append(commit)
        runs += [run(exp_run, "experiment", commit.rev) for exp in entry.get("experiments") or []
                 for exp_run in exp.get("revs") or []]
    return runs


def experiments_table(repo: Path, sort_by: str | None = "accuracy") -> pd.DataFrame:
    """One row per commit and experiment from `dvc exp show`: varying params and eval metrics."""
    runs = shown_runs(repo)
    names = {run.rev: run.name for run in runs}
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "name": run.name,
            "rev": run.rev if run.rev == WORKSPACE else run.rev[:7],
            "baseline": names.get(run.baseline, "") if run.baseline else "",
            "status": "failed" if run.failed else ("pruned" if PRUNED_AT in run.metrics else "ok" if run.metrics
                                                   else "no metrics"),
        }
        row.update({f"param {k}": v for k, v in run.params.items() if not isinstance(v, list)})
        row.update(run.metrics)
        rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    varying = [c for c in table.columns if c.startswith("param ") and table[c].astype(str).nunique() > 1]
    keep = ["name", "rev", "baseline", "status", *varying] + [c for c in table.columns if not c.startswith("param ")
                                                              and c not in ("name", "rev", "baseline", "status")]
    table = table[keep]
    if sort_by and sort_by in table.columns:
        table = table.sort_values(sort_by, ascending=lower_is_better(sort_by), na_position="last")
    return table.reset_index(drop=True)

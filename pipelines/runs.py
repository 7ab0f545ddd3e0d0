"""Runs to compare: a commit, branch, tag, DVC experiment or the workspace, read from git and
DVC, their metrics, report and predictions checked as they are read; and every run at once
(`dvc exp show`) as one table."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.dvcrepo import dvc, git
from stages.common.errors import ConfigError, DataError
from stages.common.params import flatten
from stages.common.paths import evaluation_files

WORKSPACE = "workspace"


def resolve(repo: Path, rev: str | None) -> str | None:
    """A commit sha for a git revision or an experiment name; None for the workspace."""
    if rev in (None, WORKSPACE):
        return None
    found = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if found:
        return found
    refs = (git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps") or "").splitlines()
    for line in refs:
        sha, ref = line.split(" ", 1)
        if ref.rsplit("/", 1)[-1] == rev:
            return sha
    raise ConfigError(f"'{rev}' is neither a git revision nor a DVC experiment here; see `git log` and `dvc exp show`")


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


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as err:
        raise BrokenResult(f"{where} is not valid JSON ({err}); restore it (`git checkout` it, or rerun "
                           "`dvc repro -f evaluate`)") from None


def parse_metrics(text: str, where: str) -> dict[str, Any]:
    metrics = _parse_json(text, where)
    if not isinstance(metrics, dict) or not _number(metrics.get("accuracy")):
        raise BrokenResult(f"{where} has no numeric 'accuracy' (it holds {str(metrics)[:80]}); restore it "
                           "(`git checkout` it, or rerun `dvc repro -f evaluate`)")
    return metrics


def parse_report(text: str, where: str) -> dict[str, Any]:
    report = _parse_json(text, where)
    rows = [row for name, row in report.items() if name != "accuracy"] if isinstance(report, dict) else None
    if rows is None or not all(isinstance(row, dict) and all(_number(row.get(k)) for k in ("precision", "recall",
                                                                                       "f1-score")) for row in rows):
        raise BrokenResult(f"{where} is not a classification report (one row of precision, recall and f1-score per "
                           "class); restore it (`git checkout` it, or rerun `dvc repro -f evaluate`)")
    return report


def parse_table(text: str, where: str, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV table with the given columns or, without them, a matrix of counts (row labels first)."""
    try:
        table = pd.read_csv(io.StringIO(text), index_col=None if columns else 0)
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


def experiments_table(repo: Path, sort_by: str | None = "accuracy") -> pd.DataFrame:
    """One row per commit and experiment from `dvc exp show`: varying params and eval metrics."""
    shown = json.loads(dvc(repo, "exp", "show", "--json", "-A") or "[]")
    metrics_file = evaluation_files(repo)["metrics"]
    rows = []

    def add(entry: dict, parent: str | None) -> None:
        data = entry.get("data") or {}
        rev = data.get("rev") or entry.get("rev", "")
        metrics = ((data.get("metrics") or {}).get(metrics_file) or {}).get("data") or {}
        failed = entry.get("error") or data.get("status") == "Failed"
        row: dict[str, Any] = {
            # "workspace" is DVC's name for the working tree, not a commit hash to shorten.
            "name": entry.get("name") or (rev if rev == "workspace" else rev[:7]),
            "rev": rev if rev == "workspace" else rev[:7],
            "baseline": parent or "",
            "status": "failed" if failed else ("ok" if metrics else "no metrics"),
        }
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        row.update({f"param {k}": v for k, v in flatten(params).items() if not isinstance(v, list)})
        row.update(metrics)
        rows.append(row)

    for entry in shown:
        add(entry, None)
        for exp in entry.get("experiments") or []:
            for run in exp.get("revs") or []:
                add(run, entry.get("name") or entry.get("rev", "")[:7])
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    varying = [c for c in table.columns if c.startswith("param ") and table[c].astype(str).nunique() > 1]
    keep = ["name", "rev", "baseline", "status", *varying] + [c for c in table.columns if not c.startswith("param ")
                                                              and c not in ("name", "rev", "baseline", "status")]
    table = table[keep]
    if sort_by and sort_by in table.columns:
        table = table.sort_values(sort_by, ascending="loss" in sort_by, na_position="last")
    return table.reset_index(drop=True)

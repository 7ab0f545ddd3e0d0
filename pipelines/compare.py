"""Compare two runs (commits, branches, tags or DVC experiments) with their uncertainty.

DVC gives raw diffs of params and metrics; this adds what a person needs to act on them: the
per-class changes, both confusion matrices and their difference, the curves overlaid
(`dvc plots diff`), a 95% bootstrap interval for each accuracy and for the difference, and
McNemar's exact test on the paired test predictions, ending in a plain verdict.
"""

from __future__ import annotations

import dataclasses
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.dvcrepo import dvc, git
from stages.common.errors import CommandFailed, ConfigError, DataError
from stages.common.params import flatten
from stages.common.paths import evaluation_files
from stages.common.render import render_html, report_classes

WORKSPACE = "workspace"
ALPHA = 0.05  # significance level of McNemar's test, for compare's verdict and the gate


# --- statistics ----------------------------------------------------------------------------


def bootstrap_interval(values: np.ndarray, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (per-image 0/1, or paired differences)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n_boot, len(values)))
    means = values[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> tuple[int, int, float]:
    """(A right & B wrong, A wrong & B right, exact two-sided p) on paired predictions."""
    from scipy.stats import binomtest

    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    p = 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)
    return only_a, only_b, p


def verdict(name_a: str, name_b: str, difference: float, p: float | None, alpha: float = ALPHA) -> str:
    if p is None:
        return "no paired predictions: significance unknown"
    if p >= alpha or difference == 0:
        return f"difference within noise (p={p:.3g})"
    better = name_b if difference > 0 else name_a
    return f"{better} is better, p={p:.3g}"


@dataclass(frozen=True)
class Uncertainty:
    accuracy_a: float
    interval_a: tuple[float, float]
    accuracy_b: float
    interval_b: tuple[float, float]
    difference: float
    interval_difference: tuple[float, float] | None
    only_a: int | None
    only_b: int | None
    p_value: float | None
    verdict: str


def paired(pred_a: pd.DataFrame | None, pred_b: pd.DataFrame | None) -> bool:
    """Both runs predicted the same images, in the same order: paired tests apply."""
    if pred_a is None or pred_b is None or len(pred_a) != len(pred_b):
        return False
    return bool((pred_a["actual"].to_numpy() == pred_b["actual"].to_numpy()).all())


def uncertainty(pred_a: pd.DataFrame, pred_b: pd.DataFrame, name_a: str, name_b: str, seed: int = 0) -> Uncertainty:
    """Intervals for each run; the paired interval and McNemar when both saw the same images."""
    correct_a = (pred_a["actual"] == pred_a["predicted"]).to_numpy()
    correct_b = (pred_b["actual"] == pred_b["predicted"]).to_numpy()
    acc_a, acc_b = float(correct_a.mean()), float(correct_b.mean())
    if paired(pred_a, pred_b):
        diff_interval = bootstrap_interval(correct_b.astype(float) - correct_a.astype(float), seed=seed)
        only_a, only_b, p = mcnemar(correct_a, correct_b)
    else:
        diff_interval, only_a, only_b, p = None, None, None, None
    return Uncertainty(
        acc_a, bootstrap_interval(correct_a.astype(float), seed=seed),
        acc_b, bootstrap_interval(correct_b.astype(float), seed=seed),
        acc_b - acc_a, diff_interval, only_a, only_b, p, verdict(name_a, name_b, acc_b - acc_a, p),
    )


# --- reading a run -------------------------------------------------------------------------


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


# --- rendering -----------------------------------------------------------------------------


def per_class_changes(report_a: dict, report_b: dict) -> pd.DataFrame:
    classes = [c for c in report_classes(report_b) if c in report_a]
    rows = []
    for c in classes:
        row = {"class": c}
        for key, label in (("precision", "precision"), ("recall", "recall"), ("f1-score", "F1")):
            row[label] = report_b[c][key]
            row[f"Δ {label}"] = report_b[c][key] - report_a[c][key]
        rows.append(row)
    return pd.DataFrame(rows)


def confusion_figure(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diff = b.to_numpy() - a.to_numpy()
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    limit = max(abs(diff).max(), 1)
    for ax, values, title, cmap, kwargs in (
        (axes[0], a.to_numpy(), name_a, "Blues", {}),
        (axes[1], b.to_numpy(), name_b, "Blues", {}),
        (axes[2], diff, f"{name_b} − {name_a}", "RdBu", {"vmin": -limit, "vmax": limit}),
    ):
        ax.imshow(values, cmap=cmap, **kwargs)
        ax.set_xticks(range(len(a)), a.columns, rotation=45, ha="right")
        ax.set_yticks(range(len(a)), a.index)
        ax.set(title=title, xlabel="predicted", ylabel="actual")
        for i in range(len(a)):
            for j in range(len(a)):
                ax.text(j, i, int(values[i, j]), ha="center", va="center", fontsize=7)
    fig.tight_layout()
    return fig


def _md_table(frame: pd.DataFrame) -> str:
    """Markdown table; change columns (Δ ...) signed."""
    head = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = []
    for row in frame.itertuples(index=False):
        cells = []
        for column, value in zip(frame.columns, row):
            cells.append(f"{value:+.4f}" if column.startswith("Δ") else (f"{value:.4f}" if isinstance(value, float) else str(value)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def compare(repo: Path, name_a: str, name_b: str | None, out_dir: Path) -> tuple[str, dict[str, Any]]:
    """Write compare.md/.html (and figures) to `out_dir`; return the Markdown and the same
    findings as data (what `compare --json` prints)."""
    name_b = name_b or WORKSPACE
    run_a, run_b = load_run(repo, name_a), load_run(repo, name_b)
    notes = check_comparable(run_a, run_b)
    revs = [name_a] + ([] if name_b == WORKSPACE else [name_b])
    params = json.loads(dvc(repo, "params", "diff", *revs, "--json") or "{}")
    out_dir.mkdir(parents=True, exist_ok=True)

    lines = [f"# {name_a} vs {name_b}", "", *[f"Note: {note}." for note in notes], *([""] if notes else [])]
    changed = [(k, v.get("old"), v.get("new")) for f in params.values() for k, v in sorted(f.items())]
    lines += ["## Params that differ", ""]
    lines += (["| param | " + name_a + " | " + name_b + " |", "|---|---|---|"]
              + [f"| {k} | {o} | {n} |" for k, o, n in changed]) if changed else ["none"]
    keys = [k for k in run_b.metrics if k in run_a.metrics and isinstance(run_b.metrics[k], (int, float))]
    lines += ["", "## Metrics", "", f"| metric | {name_a} | {name_b} | change |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {run_a.metrics[k]} | {run_b.metrics[k]} | {run_b.metrics[k] - run_a.metrics[k]:+.4f} |" for k in keys]

    stats = None
    if run_a.predictions is not None and run_b.predictions is not None:
        stats = uncertainty(run_a.predictions, run_b.predictions, name_a, name_b)
        lines += ["", "## Is the difference real?", "",
                  f"- accuracy {name_a}: {stats.accuracy_a:.4f} (95% bootstrap CI {stats.interval_a[0]:.4f}-{stats.interval_a[1]:.4f})",
                  f"- accuracy {name_b}: {stats.accuracy_b:.4f} (95% bootstrap CI {stats.interval_b[0]:.4f}-{stats.interval_b[1]:.4f})"]
        if stats.interval_difference is not None:
            lines += [(f"- difference: {stats.difference:+.4f} (95% paired bootstrap CI "
                      f"{stats.interval_difference[0]:+.4f} to {stats.interval_difference[1]:+.4f})"),
                      (f"- McNemar (exact): {stats.only_a} images only {name_a} got right, {stats.only_b} only "
                      f"{name_b}; p = {stats.p_value:.3g}")]
        lines += ["", f"**Verdict: {stats.verdict}**"]
    if run_a.report and run_b.report:
        lines += ["", "## Per class", "", _md_table(per_class_changes(run_a.report, run_b.report))]
    if run_a.confusion is not None and run_b.confusion is not None and run_a.confusion.shape == run_b.confusion.shape:
        fig = confusion_figure(run_a.confusion, run_b.confusion, name_a, name_b)
        fig.savefig(out_dir / "confusion.png", dpi=90)
        lines += ["", "## Confusion matrices and their difference", "", "![confusion](confusion.png)"]
    try:
        dvc(repo, "plots", "diff", *revs, "-o", str(out_dir / "plots"), "--html-template", str(offline_plots_template(repo)))
        lines += ["", "## Training curves", "", "Overlaid by `dvc plots diff`: [plots/index.html](plots/index.html)"]
    except CommandFailed as err:
        lines += ["", f"Training curves: not available ({err})"]
    text = "\n".join(lines) + "\n"
    (out_dir / "compare.md").write_text(text)
    (out_dir / "compare.html").write_text(render_html(text, f"{name_a} vs {name_b}"))
    findings = {
        "a": name_a, "b": name_b, "notes": notes,
        "params": [{"param": k, "a": o, "b": n} for k, o, n in changed],
        "metrics": {k: {"a": run_a.metrics[k], "b": run_b.metrics[k], "change": run_b.metrics[k] - run_a.metrics[k]}
                    for k in keys},
        "uncertainty": dataclasses.asdict(stats) if stats else None,
        "page": str(out_dir / "compare.html"),
    }
    return text, findings


# The Vega-Lite release DVC's plot templates are written for (their specs name the v5 schema).
VEGA_LITE_VERSION = "v5.21"


# Where the offline template is written, relative to .dvc/ as DVC reads `plots.html_template`.
OFFLINE_PLOTS_TEMPLATE = "plots/offline.html"


def offline_plots_template(repo: Path = Path(".")) -> Path:
    """The `dvc plots` HTML template with Vega, Vega-Lite and Vega-Embed inlined (vl-convert's
    bundle), so the page draws without internet; DVC's own template loads them from a CDN. Built
    once per repo (`make setup`, `run`, `compare`), untracked, and named in the repo's local DVC
    config, so plain `dvc plots show` and `diff` draw offline too. Local, not committed: DVC takes a
    configured template that is not there for the template's text, and every plots command fails."""
    path = repo / ".dvc" / OFFLINE_PLOTS_TEMPLATE
    _write_offline_plots_template(path)
    from dvc.config import Config

    config = Config(str(repo / ".dvc"), validate=False)
    if config["plots"].get("html_template") != OFFLINE_PLOTS_TEMPLATE:
        with config.edit("local") as local:
            local.setdefault("plots", {})["html_template"] = OFFLINE_PLOTS_TEMPLATE
    return path


def _write_offline_plots_template(path: Path) -> None:
    marker = f"<!-- vega-lite {VEGA_LITE_VERSION} -->"
    if not path.is_file() or marker not in path.read_text(errors="replace")[:200]:
        import vl_convert

        from stages.common.dataio import write_text

        bundle = vl_convert.javascript_bundle(vl_version=VEGA_LITE_VERSION)
        write_text(path, f"<!DOCTYPE html>\n{marker}\n<html>\n<head>\n<meta charset='utf-8'>\n{{refresh_tag}}\n"
                         f"<title>DVC plots</title>\n<script>{bundle}</script>\n"
                         "<style>table { border-spacing: 15px; }</style>\n</head>\n<body>\n{plot_divs}\n</body>\n</html>\n")


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


# --- every run at once ---------------------------------------------------------------------


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

"""Every run with metrics at once (`compare --all`): one table for the terminal, CSV and `--json`,
and the history page, `comparisons/history.html`, written from the same data.

Runs come from `dvc exp show -A` (every commit of every branch, each experiment, the workspace when
it holds a run not committed); main's line from git's first-parent history; registered versions
and stages from GTO. The page is one offline file: the table sorts and filters in the page, the
trend chart is drawn here as SVG, and the best rows link to their compare page against main.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.dvcrepo import git
from pipelines.runs import WORKSPACE, ShownRun, lower_is_better, main_branch, shown_runs
from stages.common.errors import ConfigError, DataError

PAGE = "history.html"
TREND_METRICS = ("accuracy", "f1_macro")  # drawn along main; every numeric metric is in the table
FIRST_COLUMNS = ("accuracy", "f1_macro", "loss")


@dataclass
class HistoryRun:
    name: str
    rev: str  # full sha, or "workspace"
    kind: str  # commit, experiment or workspace
    baseline: str | None  # an experiment's commit (full sha)
    date: str | None
    params: dict[str, Any]  # only those that differ from main's
    metrics: dict[str, float]
    status: str
    on_main: bool  # on main's first-parent line
    registry: list[str] = field(default_factory=list)  # GTO versions at this commit, then their stages
    page: str | None = None  # its compare page against main, relative to the history page
    page_error: str | None = None  # why that page could not be written (runs not comparable)

    @property
    def short(self) -> str:
        return self.rev if self.rev == WORKSPACE else self.rev[:7]

    @property
    def ref(self) -> str:
        """What `compare` takes for this run: an experiment's name, a commit's short sha (DVC names a
        commit after a branch or tag, which can move)."""
        return self.name if self.kind == "experiment" else self.short


@dataclass
class History:
    main: str | None  # the branch the trend follows (local main first, then origin's)
    main_run: str | None  # the run main holds: the newest on its line (its tip may be a later commit, e.g. docs)
    runs: list[HistoryRun]  # newest first
    line: list[str] = field(default_factory=list)  # main's first-parent shas, newest first

    def trend(self) -> list[HistoryRun]:
        """Main's commits with metrics, oldest first."""
        position = {sha: i for i, sha in enumerate(self.line)}
        return sorted((r for r in self.runs if r.on_main), key=lambda r: position[r.rev], reverse=True)

    def compare_command(self, run: HistoryRun) -> str | None:
        if not self.main or run.rev == self.main_run:
            return None
        return f"cifar10-pipeline compare {self.main} {run.ref}"

    def table(self, sort_by: str | None = "accuracy") -> pd.DataFrame:
        rows = [{"name": r.name, "rev": r.short, "kind": r.kind, "date": r.date,
                 "params": ", ".join(f"{k}={v}" for k, v in r.params.items()),
                 **{m: r.metrics[m] for m in FIRST_COLUMNS if m in r.metrics}, **r.metrics, "status": r.status,
                 "registry": " ".join(r.registry)} for r in self.runs]
        table = pd.DataFrame(rows)
        if sort_by and sort_by in table.columns:
            table = table.sort_values(sort_by, ascending=lower_is_better(sort_by), na_position="last", kind="stable")
        return table.reset_index(drop=True)

    def check_metric(self, metric: str) -> None:
        known = sorted({m for r in self.runs for m in r.metrics})
        if self.runs and metric not in known:
            raise ConfigError(f"no run has a metric '{metric}'; pass --sort-by one of: {', '.join(known)}")

    def as_data(self, sort_by: str | None, page: Path | None) -> dict[str, Any]:
        order = {rev: i for i, rev in enumerate(self.table(sort_by)["rev"])} if self.runs else {}
        runs = sorted(self.runs, key=lambda r: order[r.short])
        return {"main": self.main, "main_run": self.main_run, "page": str(page) if page else None,
                "runs": [{**asdict(r), "compare_command": self.compare_command(r)} for r in runs],
                "trend": [{"rev": r.rev, "name": r.name, **{m: r.metrics.get(m) for m in TREND_METRICS}}
                          for r in self.trend()]}


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def registry_marks(repo: Path) -> dict[str, list[str]]:
    """{commit sha: ["v0.0.2", "prod"]}: GTO's versions of the model and the stages they hold now."""
    from gto import api as gto
    from gto.exceptions import ArtifactNotFound

    from pipelines.registry import model_artifact

    try:
        name = model_artifact(repo)
        versions = gto.show(str(repo), name)  # each version with every stage it was ever assigned
    except (ConfigError, ArtifactNotFound):
        return {}  # no model declared in dvc.yaml, or none registered yet: nothing to mark
    holders = (gto.show(str(repo)).get(name) or {}).get("stage") or {}  # {stage: the version holding it now}
    marks: dict[str, list[str]] = {}
    for version in versions:
        now = [stage for stage, held in holders.items() if version["version"] in ([held] if isinstance(held, str)
                                                                                   else held or [])]
        marks.setdefault(version["commit_hexsha"], []).extend([version["version"], *now])
    return marks


def uncommitted_run(workspace: ShownRun, others: list[ShownRun]) -> bool:
    """The workspace is a run of its own only when no commit or experiment has its params and metrics
    (after `dvc exp run` it holds that experiment's)."""
    return not any(o.metrics == workspace.metrics and o.params == workspace.params for o in others)


def display_name(run: ShownRun) -> str:
    """DVC names a commit after a branch or tag at it; GTO's tags (`name@v1`, `name#prod#2`) say less
    than the short sha, and the registry column has them anyway."""
    return run.rev[:7] if run.kind == "commit" and ("@" in run.name or "#" in run.name) else run.name


def collect(repo: Path) -> History:
    shown = shown_runs(repo)
    main = main_branch(repo)
    line = (git(repo, "rev-list", "--first-parent", main) or "").split() if main else []
    on_main = set(line)
    base = next((r.params for r in shown if line and r.rev == line[0]), None)
    if base is None:  # no main here: the params that differ are those that differ from HEAD's
        head = git(repo, "rev-parse", "HEAD")
        base = next((r.params for r in shown if r.rev == head), {})
    marks = registry_marks(repo)
    kept = [r for r in shown if r.recorded and isinstance(r.metrics.get("accuracy"), (int, float))]
    runs = [HistoryRun(
        display_name(r), r.rev, r.kind, r.baseline, r.timestamp,
        {k: v for k, v in r.params.items() if base.get(k) != v}, numeric(r.metrics),
        "failed" if r.failed else ("uncommitted" if r.kind == WORKSPACE else "ok"), r.rev in on_main,
        marks.get(r.rev, []),
    ) for r in kept if r.kind != WORKSPACE or uncommitted_run(r, [o for o in kept if o is not r])]
    # Newest first as git orders commits (by date, a child before its parent on ties); experiments are commits too.
    order = {sha: i for i, sha in enumerate((git(repo, "rev-list", "--all", "--date-order") or "").split())}
    runs.sort(key=lambda r: -1 if r.kind == WORKSPACE else order.get(r.rev, len(order)))
    main_run = next((sha for sha in line if sha in {r.rev for r in runs}), None)
    return History(main, main_run, runs, line)


def write_compare_pages(repo: Path, history: History, out_dir: Path, count: int, sort_by: str) -> None:
    """The compare page against main for the `count` best rows by `sort_by` (main's tip has none)."""
    from pipelines.compare import compare, safe_name

    if not history.main or count <= 0:
        return
    ranked = [r for r in history.runs if r.rev != history.main_run and sort_by in r.metrics]
    ranked.sort(key=lambda r: r.metrics[sort_by], reverse=not lower_is_better(sort_by))
    for run in ranked[:count]:
        folder = out_dir / safe_name(f"{history.main}_vs_{run.ref}")
        try:
            compare(repo, history.main, run.ref, folder)
            run.page = f"{folder.name}/compare.html"
        except (ConfigError, DataError) as err:  # e.g. evaluated on another split: one row, not the page
            run.page_error = str(err)


# ---- the page ----

CHART_W, CHART_H, MARGIN = 920, 340, (30, 20, 70, 60)  # width, height; top, right, bottom, left
COLOURS = {"accuracy": "#1f77b4", "f1_macro": "#ff7f0e"}
RADII = {"accuracy": 6, "f1_macro": 3.5}  # the two often coincide: the smaller drawn on top, both seen


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    step = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(step)) if step > 0 else 0.01
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= step)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(count + 2) if first + i * step <= high + 1e-12]


def trend_svg(history: History) -> str:
    """Test accuracy and macro F1 along main's first-parent line (one point per commit with
    metrics), experiments as rings beside their commit, registered versions and stages labelled."""
    line = history.trend()
    if not line:
        return "<p>No commit on main has metrics yet: the trend starts with the first committed run.</p>"
    x_of = {r.rev: i for i, r in enumerate(line)}
    beside = [r for r in history.runs if r.kind == "experiment" and r.baseline in x_of]
    values = [r.metrics[m] for r in line + beside for m in TREND_METRICS if m in r.metrics]
    low, high = min(values), max(values)
    pad = max((high - low) * 0.1, 0.01)
    low, high = max(0.0, low - pad), min(1.0, high + pad)
    top, right, bottom, left = MARGIN
    width, height = CHART_W - left - right, CHART_H - top - bottom

    def px(i: float) -> float:
        return left + (width * (i + 0.5) / len(line))

    def py(v: float) -> float:
        return top + height * (1 - (v - low) / (high - low))

    parts = [(f"<svg id='trend' xmlns='http://www.w3.org/2000/svg' width='{CHART_W}' height='{CHART_H}' "
              f"role='img' aria-label='test metrics along {html.escape(history.main or '')}'>"),
             f"<rect x='{left}' y='{top}' width='{width}' height='{height}' fill='#fafafa' stroke='#ccc'/>"]
    for tick in _ticks(low, high):
        parts.append(f"<line x1='{left}' x2='{left + width}' y1='{py(tick):.1f}' y2='{py(tick):.1f}' stroke='#e5e5e5'/>"
                     f"<text x='{left - 6}' y='{py(tick) + 4:.1f}' text-anchor='end' font-size='12'>{tick:.3g}</text>")
    for i, run in enumerate(line):
        label = html.escape(run.name)
        parts.append(f"<text transform='translate({px(i):.1f},{top + height + 14}) rotate(35)' font-size='12'>"
                     f"{label}</text>")
        if run.registry:
            prod = "prod" in run.registry
            parts.append(f"<text class='registry' x='{px(i):.1f}' y='{top - 8}' text-anchor='middle' font-size='12' "
                         f"font-weight='{'bold' if prod else 'normal'}' fill='{'#2a7d2a' if prod else '#555'}'>"
                         f"{html.escape(' '.join(run.registry))}</text>"
                         f"<line x1='{px(i):.1f}' x2='{px(i):.1f}' y1='{top}' y2='{top + height}' "
                         f"stroke='{'#2a7d2a' if prod else '#999'}' stroke-dasharray='4 3'/>")
    for metric in TREND_METRICS:
        points = [(px(i), py(r.metrics[metric]), r) for i, r in enumerate(line) if metric in r.metrics]
        colour = COLOURS[metric]
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' "
                     f"points='{' '.join(f'{x:.1f},{y:.1f}' for x, y, _ in points)}'/>")
        parts += [f"<a href='#run-{r.short}'><circle class='commit {metric}' cx='{x:.1f}' cy='{y:.1f}' r='{RADII[metric]}' "
                  f"fill='{colour}'><title>{html.escape(r.name)} ({r.short}) {metric} {r.metrics[metric]:.4f}"
                  f"</title></circle></a>" for x, y, r in points]
        for n, exp in enumerate(r for r in beside if metric in r.metrics):
            x = px(x_of[exp.baseline]) + 9 + 5 * (n % 4)
            parts.append(f"<a href='#run-{exp.short}'><circle class='experiment {metric}' cx='{x:.1f}' "
                         f"cy='{py(exp.metrics[metric]):.1f}' r='{RADII[metric] - 1}' fill='white' stroke='{colour}' "
                         "stroke-width='2'>"
                         f"<title>experiment {html.escape(exp.name)} {metric} {exp.metrics[metric]:.4f}</title>"
                         "</circle></a>")
    legend = [("accuracy", "test accuracy"), ("f1_macro", "macro F1")]
    for n, (metric, text) in enumerate(legend):
        x = left + 10 + 150 * n
        parts.append(f"<circle cx='{x}' cy='{top + 12}' r='5' fill='{COLOURS[metric]}'/>"
                     f"<text x='{x + 10}' y='{top + 16}' font-size='12'>{text}</text>")
    parts.append(f"<circle cx='{left + 310}' cy='{top + 12}' r='4' fill='white' stroke='#555' stroke-width='2'/>"
                 f"<text x='{left + 320}' y='{top + 16}' font-size='12'>experiment, beside its commit</text></svg>")
    return "".join(parts)


def figure(value: float) -> str:
    """Four decimals line metrics up; a learning rate or weight decay under 0.01 keeps its digits."""
    return f"{value:.4f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"


def with_gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Missing figures (a pruned point's) as None: null in JSON and Prefect's tables, not nan or <NA>."""
    return table.astype(object).where(table.notna(), None)


def markdown(table: pd.DataFrame) -> str:
    return with_gaps(table).to_markdown(index=False, missingval="")


def _cell(value: Any, sort_value: Any = None) -> str:
    shown = "" if value is None else (figure(value) if isinstance(value, float) else str(value))
    key = "" if sort_value is None else f" data-value='{html.escape(str(sort_value))}'"
    return f"<td{key}>{html.escape(shown)}</td>"


def runs_table(history: History) -> str:
    metrics = list(dict.fromkeys([*[m for m in FIRST_COLUMNS if any(m in r.metrics for r in history.runs)],
                                  *[m for r in history.runs for m in r.metrics]]))
    head = ["date", "name", "kind", "params that differ from main", *metrics, "status", "registry",
            "compare with main"]
    numeric_columns = set(metrics)
    rows = []
    for run in history.runs:
        command = history.compare_command(run)
        link = (f"<a href='{html.escape(run.page)}'>compare page</a>" if run.page
                else f"not comparable: {html.escape(run.page_error)}" if run.page_error
                else f"<code>{html.escape(command)}</code>" if command else "")
        cells = [_cell((run.date or "").replace("T", " ")[:16], run.date or ""),
                 f"<td title='{run.rev}'>{html.escape(run.name)}</td>", _cell(run.kind),
                 _cell(", ".join(f"{k}={v}" for k, v in run.params.items())),
                 *[_cell(run.metrics.get(m), run.metrics.get(m, "")) for m in metrics],
                 _cell(run.status), _cell(" ".join(run.registry)), f"<td>{link}</td>"]
        rows.append(f"<tr id='run-{run.short}' class='{run.kind}' data-rev='{run.rev}'>{''.join(cells)}</tr>")
    heads = "".join(f"<th data-type='{'number' if h in numeric_columns else 'text'}' title='sort'>{html.escape(h)}</th>"
                    for h in head)
    return f"<table id='runs'><thead><tr>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


SCRIPT = """
const table = document.getElementById('runs'), body = table.tBodies[0];
const count = document.getElementById('shown');
table.querySelectorAll('th').forEach((th, column) => th.addEventListener('click', () => {
  const descending = th.dataset.order !== 'desc', number = th.dataset.type === 'number';
  table.querySelectorAll('th').forEach(other => { delete other.dataset.order; });
  th.dataset.order = descending ? 'desc' : 'asc';
  const key = row => { const cell = row.cells[column]; const text = cell.dataset.value ?? cell.textContent;
    return number ? (text === '' ? NaN : parseFloat(text)) : text; };
  const rows = [...body.rows].sort((a, b) => {
    const x = key(a), y = key(b);
    if (number && (isNaN(x) || isNaN(y))) return isNaN(x) - isNaN(y);
    const order = number ? x - y : String(x).localeCompare(String(y));
    return descending ? -order : order; });
  rows.forEach(row => body.appendChild(row));
}));
document.getElementById('filter').addEventListener('input', event => {
  const words = event.target.value.toLowerCase().split(/\\s+/).filter(Boolean);
  let shown = 0;
  for (const row of body.rows) {
    const text = (row.textContent + ' ' + row.dataset.rev).toLowerCase();
    row.hidden = !words.every(word => text.includes(word));
    shown += !row.hidden; }
  count.textContent = shown;
});
"""

STYLE = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f0f0f0;cursor:pointer;white-space:nowrap}
th[data-order=desc]::after{content:' \\25BC'}th[data-order=asc]::after{content:' \\25B2'}
td:first-child{white-space:nowrap}tr.experiment td:nth-child(2){font-style:italic}tr:target{background:#fff6d5}code{font-size:12px}
#filter{font-size:14px;padding:4px;width:24em;margin:1em 0}"""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def render_page(history: History, repo: Path) -> str:
    commits = sum(r.kind == "commit" for r in history.runs)
    experiments = sum(r.kind == "experiment" for r in history.runs)
    where = (f"<code>{html.escape(history.main)}</code> holds the run <code>{history.main_run[:7]}</code>"
             if history.main and history.main_run else "no run on main yet")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Run history: {html.escape(repo.name)}</title>"
            f"<style>{STYLE}</style></head><body><h1>Run history of {html.escape(repo.name)}</h1>"
            f"<p>{_count(len(history.runs), 'run')} with metrics: {_count(commits, 'commit')}, "
            f"{_count(experiments, 'experiment')}; {where}. "
            "Newest first; click a column to sort, type to filter.</p>"
            f"<h2>Along main</h2>{trend_svg(history)}<h2>Every run</h2>"
            f"<input id='filter' type='search' placeholder='filter: words that every row shown contains'> "
            f"<span><span id='shown'>{len(history.runs)}</span> shown</span>"
            f"{runs_table(history)}<script>{SCRIPT}</script></body></html>\n")


def write_history(repo: Path, out_dir: Path, pages: int, sort_by: str) -> tuple[History, Path]:
    """Collect every run, write the compare pages of the best `pages` rows, then the history page."""
    from stages.common.dataio import write_text

    history = collect(repo)
    history.check_metric(sort_by)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_compare_pages(repo, history, out_dir, pages, sort_by)
    page = out_dir / PAGE
    write_text(page, render_page(history, repo))
    return history, page


def history_json(history: History, sort_by: str | None, page: Path | None) -> str:
    return json.dumps(history.as_data(sort_by, page), indent=2, default=str)

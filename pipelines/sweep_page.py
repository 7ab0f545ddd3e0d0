"""A sweep's page, `comparisons/<sweep>.html` beside its table: the ranked table, each point's
validation-accuracy curve (a pruned point's visibly cut short), Optuna's parameter importances and
a parallel-coordinates plot of the points. Inline SVG and no script: it opens offline, from a file.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.dvcrepo import git
from pipelines.history import STYLE, _cell, _ticks
from pipelines.runs import experiment_commits
from pipelines.study import optuna_distributions
from stages.common.errors import ConfigError
from stages.common.paths import artifact_paths

WIDTH, HEIGHT, MARGIN = 920, 340, (30, 30, 50, 60)  # top, right, bottom, left
PAD = 14  # between the frame and the first and last epoch: a cross drawn there stays clear of the labels
CHAR_PX = 7  # about what a character of the 11-12 px labels takes: enough to keep two labels apart
# The ranked table may have more columns than a window is wide: its headers wrap at the dots of
# their names, and it scrolls on its own rather than the whole page.
PAGE_STYLE = STYLE + "#ranked th{white-space:normal;vertical-align:bottom}.scroll{overflow-x:auto;max-width:100%}"
COLOURS = {"ok": "#1f77b4", "pruned": "#d62728", "best": "#2a7d2a"}
# DVCLive's file for the validation accuracy per epoch, under the train stage's folder (dvc.yaml's plots:).
VAL_CURVE = "plots/metrics/eval/accuracy.tsv"


def curves(repo: Path, names: list[str]) -> dict[str, list[float]]:
    """Each named experiment's validation accuracy per epoch, read from its commit."""
    revs = experiment_commits(repo)
    path = artifact_paths(repo)["train"] / VAL_CURVE
    out = {}
    for name in names:
        text = git(repo, "show", f"{revs[name]}:{path.as_posix()}") if name in revs else None
        rows = [line.split("\t") for line in (text or "").splitlines()[1:] if line.strip()]
        out[name] = [float(row[-1]) for row in rows]
    return out


def importances(points: dict[str, dict[str, Any]], values: dict[str, float], space: dict[str, Any]) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) over the finished points; empty below three of them,
    when no parameter varies, or when the values are not numbers or choices Optuna can weigh."""
    import optuna

    try:
        distributions = optuna_distributions(space)
    except (ConfigError, ValueError, TypeError):
        return {}
    varying = {key: dist for key, dist in distributions.items()
               if len({repr(points[name].get(key)) for name in values}) > 1}
    if len(values) < 3 or not varying:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    try:
        study.add_trials([optuna.trial.create_trial(params={k: points[name][k] for k in varying}, distributions=varying,
                                                    value=value) for name, value in values.items()])
        return optuna.importance.get_param_importances(study)
    except (ValueError, TypeError, RuntimeError):  # values Optuna cannot weigh (a mapping, a list): no importances
        return {}


def _frame(svg_id: str, label: str) -> tuple[list[str], int, int, int, int]:
    top, right, bottom, left = MARGIN
    width, height = WIDTH - left - right, HEIGHT - top - bottom
    return ([(f"<svg id='{svg_id}' xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' role='img' "
             f"aria-label='{html.escape(label)}'>"),
             f"<rect x='{left}' y='{top}' width='{width}' height='{height}' fill='#fafafa' stroke='#ccc'/>"],
            top, left, width, height)


def curves_svg(table: pd.DataFrame, per_point: dict[str, list[float]]) -> str:
    drawn = {name: values for name, values in per_point.items() if values}
    if not drawn:
        return "<p>No point recorded a validation curve (a run without a validation split has none).</p>"
    epochs = max(len(v) for v in drawn.values())
    every = [v for values in drawn.values() for v in values]
    low, high = max(0.0, min(every) - 0.02), min(1.0, max(every) + 0.02)
    parts, top, left, width, height = _frame("curves", "validation accuracy per epoch, each point")

    def px(epoch: int) -> float:
        return left + PAD + (width - 2 * PAD) * (epoch - 1) / max(epochs - 1, 1)

    def py(value: float) -> float:
        return top + PAD + (height - 2 * PAD) * (1 - (value - low) / max(high - low, 1e-9))

    for tick in _ticks(low, high):
        parts.append(f"<text x='{left - 6}' y='{py(tick) + 4:.1f}' text-anchor='end' font-size='12'>{tick:.3g}</text>")
    every = math.ceil(4 * CHAR_PX / ((width - 2 * PAD) / max(epochs - 1, 1)))  # many epochs: every n-th labelled
    for epoch in range(1, epochs + 1, every):
        parts.append(f"<text x='{px(epoch):.1f}' y='{top + height + 16}' text-anchor='middle' font-size='12'>{epoch}</text>")
    parts.append(f"<text x='{left + width / 2}' y='{HEIGHT - 6}' text-anchor='middle' font-size='12'>epoch</text>")
    status = dict(zip(table["name"], table["status"]))
    best = table["name"].iloc[0] if len(table) and table["status"].iloc[0] == "ok" else None
    for name, values in sorted(drawn.items(), key=lambda item: item[0] == best):  # the best drawn last, on top
        kind = "best" if name == best else status.get(name, "ok")
        colour = COLOURS.get(kind, "#999")
        points = " ".join(f"{px(i + 1):.1f},{py(v):.1f}" for i, v in enumerate(values))
        dash = " stroke-dasharray='5 3'" if kind == "pruned" else ""
        parts.append(f"<polyline class='curve {kind}' fill='none' stroke='{colour}' stroke-width='{3 if kind == 'best' else 1.5}'"
                     f"{dash} points='{points}'><title>{html.escape(name)}: {kind}, {len(values)} epochs</title></polyline>")
        if kind == "pruned":  # where its pruner stopped it
            x, y = px(len(values)), py(values[-1])
            parts.append(f"<path class='cut' d='M{x - 5:.1f},{y - 5:.1f}L{x + 5:.1f},{y + 5:.1f}M{x - 5:.1f},{y + 5:.1f}"
                         f"L{x + 5:.1f},{y - 5:.1f}' stroke='{colour}' stroke-width='2'/>")
    legend = [("best", "best finished point"), ("ok", "finished"), ("pruned", "pruned (x: where it stopped)")]
    for n, (kind, text) in enumerate(legend):
        x = left + 10 + 200 * n
        parts.append(f"<line x1='{x}' x2='{x + 20}' y1='{top + 12}' y2='{top + 12}' stroke='{COLOURS[kind]}' "
                     f"stroke-width='2'/><text x='{x + 26}' y='{top + 16}' font-size='12'>{text}</text>")
    return "".join(parts) + "</svg>"


def importances_svg(found: dict[str, float]) -> str:
    if not found:
        return "<p>Importances need at least three finished points and a parameter that varies.</p>"
    rows = []
    for key, share in found.items():
        rows.append(f"<tr><td><code>{html.escape(key)}</code></td><td><svg width='300' height='14'>"
                    f"<rect class='importance' width='{300 * share:.1f}' height='14' fill='{COLOURS['ok']}'/></svg>"
                    f"</td><td>{share:.3f}</td></tr>")
    return f"<table id='importances'><tr><th>parameter</th><th colspan='2'>importance (fANOVA)</th></tr>{''.join(rows)}</table>"


def _axis(values: list[Any]) -> tuple[Any, list[str]]:
    """A value's place along an axis, 0..1 (log for a range over a decade), and the axis' labels.
    A missing value (a pruned point has no test metric) has no place."""
    values = [v for v in values if not (v is None or v is pd.NA or isinstance(v, float) and math.isnan(v))]
    numeric = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numeric) == len(values) and len(set(numeric)) > 1:
        low, high = min(numeric), max(numeric)
        log = low > 0 and high / low > 10
        scale = (lambda v: math.log(v)) if log else (lambda v: v)
        span = scale(high) - scale(low)
        return (lambda v: (scale(v) - scale(low)) / span), [f"{high:.3g}", f"{low:.3g}"]
    levels = sorted({str(v) for v in values})
    return (lambda v: levels.index(str(v)) / max(len(levels) - 1, 1)), [levels[-1], levels[0]]


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key as the fewest of its last parts that no other key ends with (the whole key
    stays in the label's tooltip)."""
    def tail(key: str, n: int) -> str:
        return ".".join(key.split(".")[-n:])

    def unique(name: str, key: str) -> bool:
        return not any(other != key and (other == name or other.endswith("." + name)) for other in keys)

    # A key that another ends with ("lr" beside "train.lr") is shown whole.
    return {key: next((tail(key, n) for n in range(1, key.count(".") + 1) if unique(tail(key, n), key)), key)
            for key in keys}


def parallel_svg(table: pd.DataFrame, keys: list[str], metric: str) -> str:
    shown = table[table["status"] != "failed"]
    axes = [k for k in keys if k in shown and shown[k].astype(str).nunique() > 1] + ([metric] if metric in shown else [])
    if len(shown) < 2 or len(axes) < 2:
        return "<p>Parallel coordinates need two points and a parameter that varies.</p>"
    parts, top, left, width, height = _frame("parallel", "each point across its parameters and its metric")
    scales = {key: _axis(list(shown[key])) for key in axes}

    def px(i: int) -> float:
        return left + width * i / (len(axes) - 1)

    names = short_names(axes)
    crowded = max(len(name) for name in names.values()) * CHAR_PX > width / (len(axes) - 1)
    for i, key in enumerate(axes):
        _, (high, low) = scales[key]
        below = top + height + 16 + (14 if crowded and i % 2 else 0)  # crowded: every other name a line lower
        parts.append(f"<line x1='{px(i):.1f}' x2='{px(i):.1f}' y1='{top}' y2='{top + height}' stroke='#888'/>"
                     f"<text x='{px(i):.1f}' y='{below}' text-anchor='middle' font-size='11'>"
                     f"<title>{html.escape(key)}</title>{html.escape(names[key])}</text>"
                     f"<text x='{px(i) + 3:.1f}' y='{top - 4}' font-size='10'>{html.escape(high)}</text>"
                     f"<text x='{px(i) + 3:.1f}' y='{top + height - 3}' font-size='10'>{html.escape(low)}</text>")
    best = table["name"].iloc[0] if table["status"].iloc[0] == "ok" else None
    for row in shown.to_dict("records"):
        kind = "best" if row["name"] == best else row["status"]
        ys = [top + height * (1 - scales[key][0](row[key])) if pd.notna(row[key]) else None for key in axes]
        drawn = [(px(i), y) for i, y in enumerate(ys) if y is not None]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in drawn)
        dash = " stroke-dasharray='5 3'" if kind == "pruned" else ""
        colour, title = COLOURS.get(kind, "#999"), f"<title>{html.escape(row['name'])}</title>"
        parts.append(f"<polyline class='point {kind}' fill='none' stroke='{colour}' "
                     f"stroke-width='{3 if kind == 'best' else 1.5}'{dash} points='{points}'>{title}</polyline>")
        if drawn and len(drawn) < len(axes):  # a line that stops short (no metric) ends in a dot, seen even alone
            parts.append(f"<circle class='stop' cx='{drawn[-1][0]:.1f}' cy='{drawn[-1][1]:.1f}' r='3' fill='{colour}'>"
                         f"{title}</circle>")
    return "".join(parts) + "</svg>"


def ranked_table(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{'.<wbr>'.join(html.escape(part) for part in str(c).split('.'))}</th>" for c in table.columns)
    rows = [f"<tr class='{html.escape(str(row['status']))}'>" + "".join(_cell(None if pd.isna(v) else v) if not
            isinstance(v, list) else _cell(str(v)) for v in row.values()) + "</tr>" for row in table.to_dict("records")]
    return f"<table id='ranked'><tr>{head}</tr>{''.join(rows)}</table>"


def render(name: str, table: pd.DataFrame, keys: list[str], metric: str, per_point: dict[str, list[float]],
           found: dict[str, float]) -> str:
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    said = ", ".join(f"{counts[s]} {s}" for s in ("ok", "pruned", "failed") if s in counts) or "no point ended"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Sweep {html.escape(name)}</title>"
            f"<style>{PAGE_STYLE}</style></head><body><h1>Sweep {html.escape(name)}</h1>"
            f"<p>{len(table)} points: {said}. Ranked by {html.escape(metric)}; pruned points come after the finished "
            "and are never the best.</p>"
            f"<h2>Points</h2><div class='scroll'>{ranked_table(table)}</div>"
            f"<h2>Validation accuracy per epoch</h2>{curves_svg(table, per_point)}"
            f"<h2>Parameter importances</h2>{importances_svg(found)}"
            f"<h2>Parallel coordinates</h2>{parallel_svg(table, keys, metric)}</body></html>\n")

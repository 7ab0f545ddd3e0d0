"""Compare two runs (commits, branches, tags or DVC experiments) with their uncertainty.

DVC gives raw diffs of params and metrics; this adds what a person needs to act on them: the
per-class changes, both confusion matrices and their difference, the curves overlaid
(`dvc plots diff`), a 95% bootstrap interval for each accuracy and for the difference, and
McNemar's exact test on the paired test predictions, ending in a plain verdict.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pandas as pd

from pipelines.dvcrepo import dvc
from pipelines.runs import WORKSPACE, check_comparable, load_curves, load_run
from pipelines.statistics import per_class_changes, uncertainty
from stages.common.errors import CommandFailed
from stages.common.render import render_html

# Figures are drawn at the size they are shown (the page is 60em, 960 px, wide), so a count in a
# cell is 11 px text at 100% zoom: never scaled down by the browser.
FIGURE_DPI = 100
PAGE_WIDTH_IN = 9.4
CELL_FONT_PT = 9
LINE_STYLES = ("-", "--", ":", "-.")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write a figure and let it go: `compare --all` draws several pages in one process."""
    fig.savefig(path)
    _pyplot().close(fig)


def _matrix(ax, values, labels: list[str], title: str, cmap: str, vmin: float, vmax: float):
    """One confusion matrix drawn as the report draws it: actual down the side, predicted along the
    bottom, every count written in its cell in a colour that reads on the cell's shade."""
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
    k = len(labels)
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    ax.set(title=title, xlabel="predicted", ylabel="actual")
    for i in range(k):
        for j in range(k):
            shade = (values[i, j] - vmin) / ((vmax - vmin) or 1)
            dark = shade > 0.6 if cmap == "Blues" else abs(shade - 0.5) > 0.35
            ax.text(j, i, int(values[i, j]), ha="center", va="center", fontsize=CELL_FONT_PT,
                    color="white" if dark else "black")
    return image


def confusion_figures(a: pd.DataFrame, b: pd.DataFrame, name_a: str, name_b: str):
    """Both matrices on one colour scale with one colour bar, then their difference on a diverging
    scale centred on zero with its own."""
    plt = _pyplot()
    labels = [str(c) for c in a.columns]
    top = max(a.to_numpy().max(), b.to_numpy().max(), 1)
    pair, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH_IN, 4.5), dpi=FIGURE_DPI, layout="constrained")
    for ax, frame, name in ((axes[0], a, name_a), (axes[1], b, name_b)):
        image = _matrix(ax, frame.to_numpy(), labels, name, "Blues", 0, top)
    pair.colorbar(image, ax=axes, shrink=0.8, label="images")
    diff_values = b.to_numpy() - a.to_numpy()
    limit = max(abs(diff_values).max(), 1)
    diff, ax = plt.subplots(figsize=(PAGE_WIDTH_IN * 0.62, 5.2), dpi=FIGURE_DPI, layout="constrained")
    image = _matrix(ax, diff_values, labels, f"{name_b} − {name_a}", "RdBu", -limit, limit)
    diff.colorbar(image, ax=ax, shrink=0.8, label="change in images")
    return pair, diff


def curves_figure(curves_a: dict, curves_b: dict, name_a: str, name_b: str):
    """Each declared per-epoch plot with both runs on the same axes: one colour per run, one line
    style per file (train, eval)."""
    plt = _pyplot()
    titles = [t for t in curves_a if t in curves_b]
    fig, axes = plt.subplots(1, len(titles), figsize=(PAGE_WIDTH_IN, 3.6), dpi=FIGURE_DPI, layout="constrained",
                             squeeze=False)
    for ax, title in zip(axes[0], titles):
        for colour, name, curves in (("tab:blue", name_a, curves_a), ("tab:orange", name_b, curves_b)):
            for style, (file, frame) in zip(LINE_STYLES, curves[title]):
                ax.plot(frame["step"], frame["value"], style, color=colour, marker="o", markersize=3,
                        label=f"{name} {Path(file).parent.name}")
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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


def _label(name: str) -> str:
    """How a run is named on the page: a full commit sha as git shortens it."""
    return name[:7] if re.fullmatch(r"[0-9a-f]{40}", name) else name


def compare(repo: Path, name_a: str, name_b: str | None, out_dir: Path) -> tuple[str, dict[str, Any]]:
    """Write compare.md/.html (and figures) to `out_dir`; return the Markdown and the same
    findings as data (what `compare --json` prints)."""
    name_b = name_b or WORKSPACE
    run_a, run_b = load_run(repo, name_a), load_run(repo, name_b)
    notes = check_comparable(run_a, run_b)
    revs = [name_a] + ([] if name_b == WORKSPACE else [name_b])
    name_a, name_b = _label(name_a), _label(name_b)
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
    per_class = pd.DataFrame()
    if run_a.report and run_b.report:
        per_class = per_class_changes(run_a.report, run_b.report)
        per_class = per_class.loc[per_class["Δ F1"].abs().sort_values(ascending=False, kind="stable").index]
        lines += ["", "## Per class, largest change in F1 first", "", _md_table(per_class)]
    if run_a.confusion is not None and run_b.confusion is not None and run_a.confusion.shape == run_b.confusion.shape:
        pair, diff = confusion_figures(run_a.confusion, run_b.confusion, name_a, name_b)
        _save(pair, out_dir / "confusion.png")
        _save(diff, out_dir / "confusion_difference.png")
        lines += ["", "## Confusion matrices", "", "![confusion matrices](confusion.png)", "",
                  "![their difference](confusion_difference.png)"]
    lines += ["", "## Training curves", ""]
    curves_a, curves_b = load_curves(repo, run_a.sha), load_curves(repo, run_b.sha)
    if set(curves_a) & set(curves_b):
        _save(curves_figure(curves_a, curves_b, name_a, name_b), out_dir / "curves.png")
        lines += ["![training curves](curves.png)", ""]
    try:
        dvc(repo, "plots", "diff", *revs, "-o", str(out_dir / "plots"), "--html-template", str(offline_plots_template(repo)))
        lines += ["Interactive, from `dvc plots diff`: [plots/index.html](plots/index.html)"]
    except CommandFailed as err:
        lines += [f"`dvc plots diff` could not draw them ({err})"]
    text = "\n".join(lines) + "\n"
    (out_dir / "compare.md").write_text(text)
    (out_dir / "compare.html").write_text(render_html(text, f"{name_a} vs {name_b}"))
    findings = {
        "a": name_a, "b": name_b, "notes": notes,
        "params": [{"param": k, "a": o, "b": n} for k, o, n in changed],
        "metrics": {k: {"a": run_a.metrics[k], "b": run_b.metrics[k], "change": run_b.metrics[k] - run_a.metrics[k]}
                    for k in keys},
        "uncertainty": dataclasses.asdict(stats) if stats else None,
        "per_class": per_class.to_dict("records"),
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

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
from pipelines.runs import WORKSPACE, check_comparable, load_run
from pipelines.statistics import per_class_changes, uncertainty
from stages.common.errors import CommandFailed
from stages.common.render import render_html


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

"""The history page and `compare --all` on a real git + DVC repo with commits on main, a side
branch, DVC experiments and GTO versions (the `history_repo` fixture: a fast scoring stage stands
in for training)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import cli, not_blank, visit


@pytest.mark.e2e
def test_history_page_shows_every_run_with_metrics_and_main_s_trend(history_repo, prefect_env, tmp_path):
    repo, shas = history_repo
    result = cli(prefect_env, "compare", "--all", "--json", "--pages", "3", "--repo", str(repo))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    runs = {r["rev"]: r for r in data["runs"]}
    # Every run: five on main, the branch's, two experiments; no commit without (or with the same) run.
    assert shas["skeleton"] not in runs and shas["docs"] not in runs and len(runs) == 8, runs.keys()
    assert sorted(r["name"] for r in data["runs"] if r["kind"] == "experiment") == ["lr-high", "lr-low"]
    assert all(r["baseline"] == shas[4] for r in data["runs"] if r["kind"] == "experiment")
    # The params shown are those that differ from main's tip (6 epochs).
    assert runs[shas[2]]["params"] == {"train.epochs": 2} and runs[shas[6]]["params"] == {}
    assert next(r for r in data["runs"] if r["name"] == "lr-low")["params"] == {"train.epochs": 4,
                                                                              "train.learning_rate": 0.5}
    # The trend follows main's first parents, oldest first; the branch's run is not on it.
    assert [p["rev"] for p in data["trend"]] == [shas[e] for e in (2, 3, 4, 5, 6)]
    assert [p["accuracy"] for p in data["trend"]] == sorted(p["accuracy"] for p in data["trend"])
    assert runs[shas[3]]["registry"] == ["v0.0.1"] and runs[shas[5]]["registry"] == ["v0.0.2", "prod"]
    # Ranked by accuracy, as the table; the three best but main's tip have a page, the rest a command.
    # The best was evaluated on another split: its row says so, and the page goes on.
    accuracies = [r["metrics"]["accuracy"] for r in data["runs"]]
    assert accuracies == sorted(accuracies, reverse=True)
    with_page = [r for r in data["runs"] if r["page"]]
    assert [r["rev"] for r in with_page] == [shas[5], shas[4]]
    assert "on the test split and" in runs[shas["feature"]]["page_error"]
    folder = repo / "comparisons"
    assert all((folder / r["page"]).is_file() for r in with_page)
    assert next(r for r in data["runs"] if r["name"] == "lr-low")["compare_command"] == \
        "cifar10-pipeline compare main lr-low"

    page = visit((folder / "history.html").as_uri(), tmp_path / "browser", settle_s=0.5, script=[
        "document.querySelectorAll('#trend circle.commit.accuracy').length",
        "document.querySelectorAll('#trend circle.experiment.accuracy').length",
        "[...document.querySelectorAll('#runs tbody tr')].map(r => r.cells[1].textContent)",
        # a user sorts by accuracy, then filters to the experiments
        ("[...document.querySelectorAll('#runs th')].find(th => th.textContent === 'accuracy').click(),"
        " [...document.querySelectorAll('#runs tbody tr')].map(r => r.cells[1].textContent)"),
        ("(e => (e.value = 'experiment', e.dispatchEvent(new Event('input'))))(document.getElementById('filter')),"
        " [...document.querySelectorAll('#runs tbody tr')].filter(r => !r.hidden).length"),
    ])
    points, rings, newest_first, by_accuracy, filtered = page.values
    assert page.external() == [] and page.failed == [] and not_blank(page.screenshot)
    assert points == 5 and rings == 2
    assert newest_first[0] == "feature" and newest_first[-1] == shas[2][:7]
    assert by_accuracy == [r["name"] for r in data["runs"]] and by_accuracy != newest_first
    assert filtered == 2
    assert "v0.0.2 prod" in page.text and "cifar10-pipeline compare main lr-low" in page.text

    typo = cli(prefect_env, "compare", "--all", "--sort-by", "acuracy", "--repo", str(repo))
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        "error: no run has a metric 'acuracy'; pass --sort-by one of: accuracy, f1_macro, images, loss"]


@pytest.mark.e2e
def test_two_run_page_draws_curves_and_readable_matrices(history_repo, prefect_env, tmp_path):
    repo, shas = history_repo
    out = tmp_path / "pair"
    result = cli(prefect_env, "compare", shas[2], "lr-high", "--out", str(out), "--json", "--repo", str(repo))
    assert result.returncode == 0, result.stderr
    findings = json.loads(result.stdout)
    changes = [abs(row["Δ F1"]) for row in findings["per_class"]]
    assert changes == sorted(changes, reverse=True) and len(changes) == 4
    page = visit((out / "compare.html").as_uri(), tmp_path / "browser", settle_s=0.5, script=[
        # each figure: drawn, and shown at its own size (never scaled down, so its text stays legible)
        "[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.width])",
    ])
    shown = {src: (natural, width) for src, natural, width in page.values[0]}
    assert set(shown) == {"confusion.png", "confusion_difference.png", "curves.png"}
    assert all(natural > 300 and natural == width for natural, width in shown.values()), shown
    assert page.external() == [] and "Per class, largest change in F1 first" in page.text and not_blank(page.screenshot)


def test_the_figures_text_is_legible_and_the_scales_shared():
    """Counts in cells at 11 px or more; both matrices on one colour scale, the difference centred on zero."""
    import pandas as pd

    from pipelines.compare import FIGURE_DPI, confusion_figures

    labels = ["cat", "dog", "frog"]
    a = pd.DataFrame([[90, 5, 5], [10, 80, 10], [0, 0, 100]], index=labels, columns=labels)
    b = pd.DataFrame([[95, 5, 0], [30, 60, 10], [0, 0, 100]], index=labels, columns=labels)
    pair, diff = confusion_figures(a, b, "A", "B")
    left, right = (ax.images[0] for ax in pair.axes[:2])
    assert left.get_clim() == right.get_clim() == (0, 100)
    assert diff.axes[0].images[0].get_clim() == (-20, 20) and diff.axes[0].images[0].get_cmap().name == "RdBu"
    assert len(pair.axes) == 3 and len(diff.axes) == 2  # one colour bar each
    cells = [t for ax in (*pair.axes[:2], diff.axes[0]) for t in ax.texts]
    assert len(cells) == 27 and min(t.get_fontsize() for t in cells) * FIGURE_DPI / 72 >= 11
    assert all(ax.get_xlabel() == "predicted" and ax.get_ylabel() == "actual" for ax in (*pair.axes[:2], diff.axes[0]))


def test_small_figures_keep_their_digits_and_missing_ones_are_blank():
    """Seed 002's learning rates (1e-4..1e-3) all read 0.0001-0.0010 on the pages, two points apart
    by 2e-5 the same; a pruned point's missing test figures read nan and <NA> in the sweep's summary."""
    import pandas as pd

    from pipelines.history import _cell, markdown

    assert [_cell(v) for v in (0.00012, 0.00014, 1e-9, 0.0, 0.84)] == [
        "<td>0.00012</td>", "<td>0.00014</td>", "<td>1e-09</td>", "<td>0.0000</td>", "<td>0.8400</td>"]
    table = pd.DataFrame([{"name": "p-1", "accuracy": 0.84, "pruned_after_epoch": None},
                          {"name": "p-2", "accuracy": None, "pruned_after_epoch": 1}])
    table["pruned_after_epoch"] = table["pruned_after_epoch"].astype("Int64")
    text = markdown(table)
    assert "nan" not in text.lower() and "<NA>" not in text and "0.84" in text, text

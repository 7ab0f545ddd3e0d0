import re

import pandas as pd
import pytest

from pipelines.sweep_page import importances, render, short_names
from tests.helpers import visit

SPACE = {"train.learning_rate": {"log_uniform": [0.001, 1.0]}, "train.optimizer": {"choice": ["adam", "sgd"]}}


def sweep_table() -> tuple[pd.DataFrame, dict]:
    drawn = {f"s-{i}": {"train.learning_rate": 0.001 * 3**i, "train.optimizer": "adam" if i % 2 else "sgd"}
             for i in range(1, 6)}
    rows = [{"name": name, **point, "accuracy": 0.5 + 0.05 * i, "status": "ok"} for i, (name, point) in enumerate(drawn.items())]
    rows[0].update(status="pruned", pruned_after_epoch=1, accuracy=None)  # a pruned model is not evaluated
    rows[1].update(status="failed", accuracy=None)
    table = pd.DataFrame(rows).iloc[[4, 3, 2, 0, 1]].reset_index(drop=True)  # as the sweep ranks them
    return table, drawn


def test_the_page_ranks_draws_each_curve_cuts_the_pruned_and_weighs_the_parameters():
    table, drawn = sweep_table()
    finished = dict(zip(table.loc[table["status"] == "ok", "name"], table.loc[table["status"] == "ok", "accuracy"]))
    found = importances(drawn, finished, SPACE)
    assert set(found) == {"train.learning_rate", "train.optimizer"} and abs(sum(found.values()) - 1) < 1e-6
    curves = {"s-5": [0.3, 0.5, 0.7], "s-4": [0.3, 0.4, 0.6], "s-3": [0.2, 0.3, 0.5], "s-1": [0.1]}
    page = render("s", table, ["train.learning_rate", "train.optimizer"], "accuracy", curves, found)
    assert page.count("<tr class='") == 5 and page.index("s-5") < page.index("s-1")  # ranked, best first
    assert len(re.findall(r"class='curve (?:ok|best|pruned)'", page)) == 4
    assert "class='curve best'" in page and page.count("class='cut'") == 1  # the pruned one ends in a cross
    assert page.count("class='importance'") == 2 and "<script" not in page and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", "")
    assert len(re.findall(r"class='point (?:ok|best|pruned)'", page)) == 4  # failed points have no values to draw


def test_pruned_points_without_a_test_metric_are_drawn_on_their_parameters():
    """One point finished and two were pruned (evaluate does not evaluate a pruned model): the
    metric's axis holds the one figure there is, the pruned points' lines end before it."""
    table, _ = sweep_table()
    table = table.iloc[[0, 3]].copy()
    table = pd.concat([table, table.iloc[[1]].assign(name="s-6", **{"train.optimizer": "sgd"})], ignore_index=True)
    page = render("s", table, ["train.learning_rate", "train.optimizer"], "accuracy", {"s-5": [0.5, 0.7]}, {})
    axis = re.search(r"<svg id='parallel'.*?</svg>", page, re.DOTALL).group(0)
    assert len(re.findall(r"class='point (?:best|pruned)'", axis)) == 3 and "nan" not in axis.lower()
    lines = dict(re.findall(r"class='point (\w+)'.*?points='([^']*)'", axis))
    assert len(lines["best"].split()) == 3 and len(lines["pruned"].split()) == 2
    assert axis.count("class='stop'") == 2  # where each pruned line ends
    # One parameter: a pruned point is one vertex, no line, and was drawn invisible.
    alone = render("s", table.drop(columns="train.optimizer"), ["train.learning_rate"], "accuracy", {}, {})
    assert re.search(r"<svg id='parallel'.*?</svg>", alone, re.DOTALL).group(0).count("class='stop'") == 2


def test_importances_need_three_finished_points_and_a_parameter_that_varies():
    _, drawn = sweep_table()
    assert importances(drawn, {"s-4": 0.6, "s-5": 0.7}, SPACE) == {}
    same = {name: {**point, "train.optimizer": "adam", "train.learning_rate": 0.01} for name, point in drawn.items()}
    assert importances(same, {"s-3": 0.5, "s-4": 0.6, "s-5": 0.7}, SPACE) == {}
    mappings = {name: {"train.augment": {"flip": i % 2 == 0}} for i, name in enumerate(drawn)}
    assert importances(mappings, {"s-3": 0.5, "s-4": 0.6, "s-5": 0.7}, {"train.augment": [{"flip": True}, {"flip": False}]}) == {}


def test_a_parameter_is_named_by_the_fewest_last_parts_no_other_ends_with():
    keys = ["train.arch.fast_vgg.widths", "train.learning_rate", "train.optimizer.learning_rate", "accuracy"]
    assert short_names(keys) == {"train.arch.fast_vgg.widths": "widths", "train.learning_rate": "train.learning_rate",
                                 "train.optimizer.learning_rate": "optimizer.learning_rate", "accuracy": "accuracy"}
    assert short_names(["lr", "train.lr"]) == {"lr": "lr", "train.lr": "train.lr"}


# In the page: an SVG's labels that overlap another label or a pruned point's cross (crosses may meet).
OVERLAPS_JS = """[...document.querySelectorAll('svg')].flatMap(svg => {
  const marks = [...svg.querySelectorAll('text, path.cut')].map(e => [e.textContent || 'x', e.getBoundingClientRect()]);
  const meet = (a, b) => a.left < b.right - 1 && b.left < a.right - 1 && a.top < b.bottom - 1 && b.top < a.bottom - 1;
  return marks.flatMap(([n, a], i) => marks.slice(i + 1).filter(([m, b]) => (n !== 'x' || m !== 'x') && meet(a, b))
    .map(([m]) => svg.id + ': ' + n + ' / ' + m));
})"""


@pytest.mark.slow
def test_a_wide_long_sweep_fits_a_1000_pixel_window_and_no_label_overlaps_another(tmp_path):
    keys = [f"train.arch.fast_vgg.block_{i}_width" for i in range(6)] + ["train.optimizer.weight_decay",
                                                                           "train.learning_rate"]
    rows = [{"name": f"w-{i}", **{key: 0.001 * (i + 1) * (j + 1) for j, key in enumerate(keys)}, "accuracy": 0.3 + 0.01 * i,
             "f1_macro": 0.3, "loss": 1.9, "status": "ok" if i < 2 else "pruned", "pruned_after_epoch": None if i < 2 else 1}
            for i in range(16)]
    table = pd.DataFrame(rows).sort_values(["status", "accuracy"], ascending=[True, False]).reset_index(drop=True)
    # 60 epochs for the finished points; each pruned one stopped after its first, at the lowest value drawn.
    curves = {row["name"]: [0.1 + 0.008 * e for e in range(60)] if row["status"] == "ok" else [0.1] for row in rows}
    page = tmp_path / "w.html"
    page.write_text(render("w", table, keys, "accuracy", curves, {}))
    shown = visit(page.as_uri(), tmp_path / "browser", settle_s=0.5, window=(1000, 1400), script=[
        "document.documentElement.scrollWidth - window.innerWidth", OVERLAPS_JS,
        "document.querySelector('#ranked').getBoundingClientRect().width > window.innerWidth"])
    page_wider_than_window, overlaps, table_wider_than_window = shown.values
    assert table_wider_than_window  # the case at hand: more columns than the window holds
    assert page_wider_than_window <= 0, "the page scrolls sideways: the table should scroll on its own"
    assert overlaps == [], overlaps
    assert shown.charts == 2 and not shown.external()

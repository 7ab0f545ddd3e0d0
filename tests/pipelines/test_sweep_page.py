import re

import pandas as pd

from pipelines.sweep_page import importances, render

SPACE = {"train.learning_rate": {"log_uniform": [0.001, 1.0]}, "train.optimizer": {"choice": ["adam", "sgd"]}}


def sweep_table() -> tuple[pd.DataFrame, dict]:
    drawn = {f"s-{i}": {"train.learning_rate": 0.001 * 3**i, "train.optimizer": "adam" if i % 2 else "sgd"}
             for i in range(1, 6)}
    rows = [{"name": name, **point, "accuracy": 0.5 + 0.05 * i, "status": "ok"} for i, (name, point) in enumerate(drawn.items())]
    rows[0].update(status="pruned", pruned_after_epoch=1)
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


def test_importances_need_three_finished_points_and_a_parameter_that_varies():
    _, drawn = sweep_table()
    assert importances(drawn, {"s-4": 0.6, "s-5": 0.7}, SPACE) == {}
    same = {name: {**point, "train.optimizer": "adam", "train.learning_rate": 0.01} for name, point in drawn.items()}
    assert importances(same, {"s-3": 0.5, "s-4": 0.6, "s-5": 0.7}, SPACE) == {}
    mappings = {name: {"train.augment": {"flip": i % 2 == 0}} for i, name in enumerate(drawn)}
    assert importances(mappings, {"s-3": 0.5, "s-4": 0.6, "s-5": 0.7}, {"train.augment": [{"flip": True}, {"flip": False}]}) == {}

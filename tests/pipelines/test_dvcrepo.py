from pathlib import Path

import pytest

from pipelines.dvcrepo import StageFailed, StageGraph, StageOutcome, _reasons, plan
from pipelines.flow import apply_overrides, check_overrides

GRAPH = StageGraph(order=["a", "b", "c", "d"], upstream={"a": [], "b": ["a"], "c": ["b"], "d": []})


def test_plan_says_why_and_what_may_follow():
    fate = plan(GRAPH, {"b": ["param b: b.x 1 -> 2"]})
    assert fate == {
        "a": "up to date",
        "b": "will run: param b: b.x 1 -> 2",
        "c": "may run: if b change its outputs",
        "d": "up to date",
    }


def test_reasons_name_the_changed_param_keys(tmp_path):
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  b:\n    params:\n      params.yaml:\n        b:\n          x: 1\n          y: 5\n")
    (tmp_path / "params.yaml").write_text("b:\n  x: 2\n  y: 5\n")
    status = {"b": [{"changed deps": {"params.yaml": {"b": "modified"}}}], "a": [{"changed outs": {"data/raw": "deleted"}}]}
    assert _reasons(tmp_path, status) == {"b": ["param b: b.x 1 -> 2"], "a": ["changed outs: data/raw deleted"]}


def test_outcome_and_failure_wording():
    assert StageOutcome("train", True, 312.4).describe() == "train: ran 312 s"
    assert StageOutcome("download", False, 0.0).describe() == "download: up to date"
    assert StageFailed("download", "x", 75).transient and not StageFailed("validate", "x", 3).transient


def test_overrides_keep_comments_and_refuse_unknown_keys(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 10   # how long\n  lr: 0.1\n")
    check_overrides(params, {"train.epochs": 3})
    apply_overrides(params, {"train.epochs": 3})
    assert params.read_text() == "train:\n  epochs: 3    # how long\n  lr: 0.1\n"
    with pytest.raises(ValueError, match="did you mean 'train.epochs'"):
        check_overrides(params, {"train.epoch": 3})
    with pytest.raises(ValueError, match="names no key"):
        check_overrides(params, {"evaluate.split": "val"})

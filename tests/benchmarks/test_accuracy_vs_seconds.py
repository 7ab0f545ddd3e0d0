"""accuracy_vs_seconds.py draws the benchmarks' per-epoch records, and refuses what is not one."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from tests.helpers import REPO, run_benchmark


def record(path, preset, accuracies, test=None):
    epochs = [{"epoch": i + 1, "seconds": 10.0, "val_accuracy": a} for i, a in enumerate(accuracies)]
    path.write_text(json.dumps({"preset": preset, "test_accuracy": test, "epochs": epochs}))
    return str(path)


def test_each_record_becomes_a_line_in_one_png(tmp_path):
    first = record(tmp_path / "a.json", "first-default", [0.5, 0.7, 0.8], test=0.81)
    second = record(tmp_path / "b.json", "airbench-cpu", [0.6, 0.8])
    out = tmp_path / "plots" / "curve.png"
    done = run_benchmark("accuracy_vs_seconds.py", first, second, "--title", "test machine", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000


def test_a_file_that_is_not_a_record_is_one_line_exit_3_and_nothing_written(tmp_path):
    good = record(tmp_path / "a.json", "default", [0.5])
    (tmp_path / "bad.json").write_text(json.dumps({"epochs": [{"seconds": 1}]}))
    out = tmp_path / "curve.png"
    done = run_benchmark("accuracy_vs_seconds.py", good, str(tmp_path / "bad.json"), "--title", "t", "--out", str(out))
    assert done.returncode == 3 and not out.exists()
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'bad.json'}: not a per-epoch record")


def test_two_runs_of_one_preset_are_told_apart_by_file_name_and_others_keep_their_name(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    labels = importlib.import_module("accuracy_vs_seconds").labels
    records = {Path("default-48-256-256.json"): {"preset": "default", "test_accuracy": 0.9039},
               Path("default-64-256-256.json"): {"preset": "default"},
               Path("first-default.json"): {"preset": "first-default", "test_accuracy": 0.8622}}
    assert list(labels(records).values()) == ["default, default-48-256-256 (test 0.9039)",
                                              "default, default-64-256-256", "first-default (test 0.8622)"]

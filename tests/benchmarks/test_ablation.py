"""The ablation and the default-against-first race run their recipes end to end on a tiny archive."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from tests import synthetic
from tests.helpers import REPO, run_benchmark

pytestmark = pytest.mark.slow  # runs the benchmark script, which trains


def test_the_ablation_scores_the_recipe_without_each_ingredient_under_each_tta_against_the_full_one(tmp_path):
    archive = synthetic.write_tar_gz(tmp_path / "tiny.tar.gz", synthetic.class_folder_files(20, 5))
    out = tmp_path / "ablation.jsonl"
    done = run_benchmark("ablation.py", "--archive", str(archive), "--epochs", "1", "--only", "full", "whiten",
                         "--set", "train.batch_size=64", "--set", "prepare.val_fraction=0.2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["variant"] for row in rows] == ["full", "whiten"] and all(row["epochs"] == 1 for row in rows)
    assert rows[1]["sets"] == ["train.batch_size=64", "prepare.val_fraction=0.2", "train.arch.fast_vgg.whiten=false"]
    assert rows[0]["train_images"] == rows[1]["train_images"] == 160  # the split --set asked for
    assert set(rows[0]["test_accuracy"]) == {"none", "flip", "flip+translate1", "flip+translate2"}
    delta = rows[1]["test_accuracy"]["flip"] - rows[0]["test_accuracy"]["flip"]
    assert f"| whiten | 1 | {rows[1]['test_accuracy']['none']:.4f}" in done.stdout and f"({delta:+.4f})" in done.stdout
    table = run_benchmark("ablation.py", "--table", "--out", str(out))
    assert table.returncode == 0 and table.stdout.strip().splitlines() == done.stdout.strip().splitlines()[-4:]


def test_each_ablation_variant_changes_the_default_recipe_into_a_valid_one(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    ablation = importlib.import_module("ablation")
    full = ablation.recipe("default", [])[0]
    for name, sets in ablation.WITHOUT.items():
        # recipe() checks the keys against the schema; a variant equal to the full recipe ablates nothing.
        assert (ablation.recipe("default", sets)[0] == full) == (name == "full"), name


def test_the_race_times_each_preset_against_the_last(tmp_path):
    archive = synthetic.write_tar_gz(tmp_path / "tiny.tar.gz", synthetic.class_folder_files(20, 5))
    done = run_benchmark("default_vs_first.py", "--archive", str(archive), "--presets", "default", "first-default",
                         "--epochs", "2", "--targets", "0.0", "1.01", "--out-dir", str(tmp_path / "race"))
    assert done.returncode == 0, done.stderr[-3000:]
    summary = (tmp_path / "race" / "summary.md").read_text()
    assert summary.startswith("CPU: ") and "| first-default | float32 | 2 |" in summary and "| 1.00 |" in summary
    assert "| default |" in summary and "s (epoch 1) | not reached |" in summary
    assert json.loads((tmp_path / "race" / "default.json").read_text())["epochs"][1]["epoch"] == 2
    # Run again: the finished records are reused, not retrained, and give the same table.
    again = run_benchmark("default_vs_first.py", "--archive", str(archive), "--presets", "default", "first-default",
                          "--epochs", "2", "--targets", "0.0", "1.01", "--out-dir", str(tmp_path / "race"))
    assert again.returncode == 0 and again.stdout.count("reusing the finished record") == 2
    assert (tmp_path / "race" / "summary.md").read_text() == summary


def test_the_race_refuses_an_unknown_preset_and_presets_that_prepare_differently(tmp_path, monkeypatch):
    done = run_benchmark("default_vs_first.py", "--archive", str(tmp_path / "absent.tar.gz"), "--presets", "nope",
                         cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("error: no preset 'nope'")
    assert list(tmp_path.iterdir()) == []  # no output folder left behind

    from stages.common.errors import ConfigError

    sys.path.insert(0, str(REPO / "benchmarks"))
    default_vs_first = importlib.import_module("default_vs_first")

    real = default_vs_first.recipe
    monkeypatch.setattr(default_vs_first, "recipe", lambda preset, sets: real(
        "default", [*sets, "prepare.val_fraction=0.2"] if preset == "first-default" else sets))
    with pytest.raises(ConfigError, match="preset first-default prepares the data differently from default"):
        default_vs_first.race(tmp_path / "absent.tar.gz", ["default", "first-default"], [0.9], tmp_path, None)

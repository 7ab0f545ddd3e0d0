"""throughput.py times the train stage's pipeline against a bare fit, or against another setting."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, run_benchmark

pytestmark = pytest.mark.slow  # runs the benchmark script, which trains


def test_versus_times_two_settings_in_turns_and_reports_their_ratio():
    done = run_benchmark("throughput.py", "--preset", "seed003", "--images", "64", "--repeats", "2",
                         "--versus", "batch_size=16", cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["versus"] == ["batch_size=16"] and "pipeline_over_bare" not in result
    assert result["pipeline_images_per_s"] > 0 and result["versus_images_per_s"] > 0
    assert result["pipeline_over_versus_median"] > 0


def test_a_malformed_override_is_one_line_and_exit_2():
    done = run_benchmark("throughput.py", "--versus", "batch_size", cwd=REPO)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        "error: --set/--versus expects key=value (e.g. mixed_precision=true), got 'batch_size'")


def test_versus_preset_times_another_presets_model():
    done = run_benchmark("throughput.py", "--preset", "seed003", "--images", "64", "--repeats", "1",
                         "--versus-preset", "seed002", cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model"] == "tutorial_cnn" and result["versus"] == "seed002"
    assert result["versus_model"]["model"] == "bn_cnn" and result["versus_model"]["batch_size"] == 64
    assert result["parameters"] != result["versus_model"]["parameters"]


def test_an_unknown_versus_preset_is_one_line_and_exit_2():
    done = run_benchmark("throughput.py", "--versus-preset", "nosuch", cwd=REPO)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith("error: no preset 'nosuch'; available: ")


def test_alone_with_a_second_side_is_one_line_and_exit_2():
    done = run_benchmark("throughput.py", "--alone", "--versus", "batch_size=16", cwd=REPO)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == \
        "error: --alone times one side only; drop --versus/--versus-preset, or --alone"

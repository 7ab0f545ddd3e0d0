"""threads.py times the train stage's pipeline under each thread setting, one process per setting."""

from __future__ import annotations

import json

import pytest

from tests.helpers import REPO, run_benchmark

pytestmark = pytest.mark.slow  # runs the benchmark script, which trains


def test_each_setting_is_timed_in_its_own_process_and_compared_with_the_first(tmp_path):
    out = tmp_path / "threads.jsonl"
    done = run_benchmark("threads.py", "--preset", "seed003", "--images", "64", "--repeats", "1", "--rounds", "1",
                         "--threads", "0,0", "1,1", "--out", str(out), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["threads"] for row in rows] == [[0, 0], [1, 1]]
    assert all(row["model"] == "tutorial_cnn" and row["pipeline_images_per_s"] > 0 for row in rows)
    summary = [json.loads(line) for line in done.stdout.strip().splitlines()[-2:]]
    assert [s["threads"] for s in summary] == ["intra auto, inter auto", "intra 1, inter 1"]
    assert summary[0]["over intra auto, inter auto"] == 1.0 and summary[1]["over intra auto, inter auto"] > 0


def test_a_malformed_setting_is_one_line_and_exit_2(tmp_path):
    done = run_benchmark("threads.py", "--threads", "2", "--out", str(tmp_path / "t.jsonl"), cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        "error: --threads 2: expected INTRA,INTER thread counts (0: TensorFlow's choice), e.g. 1,0"
    assert not (tmp_path / "t.jsonl").exists()


def test_a_failing_run_ends_with_its_own_line_and_exit_code(tmp_path):
    done = run_benchmark("threads.py", "--preset", "nosuch", "--threads", "0,0", "--out", str(tmp_path / "t.jsonl"),
                         cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: throughput.py (intra auto, inter auto) failed: no preset 'nosuch'; available: ")

"""benchmarks/records.py: every record in the folder keeps the schema, the index is current, and a
benchmark's raw output becomes a record of this machine."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("records", REPO / "benchmarks" / "records.py")
records = importlib.util.module_from_spec(spec)
spec.loader.exec_module(records)


def test_every_record_keeps_the_schema_and_the_index_is_current():
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "records.py"), "check"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "RESULTS", tmp_path)
    monkeypatch.setattr(records, "INDEX", tmp_path / "README.md")
    return tmp_path


GOOD = {"record": 1, "what": "a test", "date": "2026-12-01", "commit": "abc1234", "command": "python x.py",
        "machine": {"kind": "xeon-amx", "cpu": "Intel Xeon, 2 cores", "isa": ["avx2"], "gpu": None},
        "figures": {"seconds": 1.0}}


@pytest.mark.parametrize(("where", "change", "problem"), [
    ("xeon-amx/2026-12-01/a.json", {}, None),
    ("xeon-amx/a.json", {}, "not at <machine kind>/<YYYY-MM-DD>/<name>.json"),
    ("xeon-amx/2026-12-01/a.json", {"commit": None}, "is no commit id"),
    ("xeon-amx/2026-12-01/a.json", {"date": "2026-12-02"}, "is not its folder's"),
    ("epyc-avx2/2026-12-01/a.json", {}, "kind = its folder"),
    ("xeon-amx/2026-12-01/a.json", {"figures": None, "speed": 3}, "unknown keys speed"),
    ("xeon-amx/2026-12-01/a.json", {"files": ["plot.png"]}, "names plot.png, which is not beside it"),
])
def test_a_record_that_breaks_the_schema_is_named_with_its_problem(results, where, change, problem):
    path = results / where
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({k: v for k, v in {**GOOD, **change}.items() if v is not None or k == "gpu"}))
    found = records.problems(path)
    assert (found == []) if problem is None else any(problem in line for line in found), found


def test_raw_output_becomes_a_record_of_this_machine_at_head(results, tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw") / "rows.jsonl"
    raw.write_text('{"threads": 1, "seconds": 2.0}\n{"threads": 2, "seconds": 1.1}\n')
    out = records.add(raw, "threads-check", "threads against time", "python benchmarks/threads.py", "xeon-amx", [])
    record = json.loads(out.read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert record["commit"] == head and record["figures"]["rows"][1]["threads"] == 2
    assert record["machine"]["cpu"] and record["machine"]["kind"] == "xeon-amx"
    assert records.problems(out) == [] and "threads-check" in records.index_text()

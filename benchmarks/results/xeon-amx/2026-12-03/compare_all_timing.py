"""Time `compare --all` on a git + DVC repo with 20 commits with metrics and 2 experiments; the fast
scoring stage of tests/helpers.py (scored_project) stands in for training. Run from the repo root:
`.venv/bin/python compare_all_timing.py`."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.getcwd())
from tests.helpers import BIN, ENV, commit, dvc, scored_project

repo = scored_project(Path(tempfile.mkdtemp()) / "project")
commit(repo, "skeleton", -40, run=False)
for i in range(20):
    commit(repo, f"run {i}", i - 30, epochs=1 + i % 8, learning_rate=1.5 * (1 + i % 3))
for name, rate in (("exp-a", 0.5), ("exp-b", 15.0)):
    dvc(repo, "exp", "run", "-q", "-n", name, "-S", f"train.learning_rate={rate}")
results = {"repo": str(repo)}
for label, args in (("pages 3 (default)", []), ("pages 0", ["--pages", "0"])):
    times = []
    for _ in range(3):
        started = time.perf_counter()
        out = subprocess.run([str(BIN / "cifar10-pipeline"), "compare", "--all", "--json", *args, "--repo", str(repo)],
                             env={**ENV, "PREFECT_API_URL": ""}, capture_output=True, text=True, check=True)
        times.append(round(time.perf_counter() - started, 2))
    data = json.loads(out.stdout)
    results[label] = {"seconds": times, "runs": len(data["runs"]), "trend_points": len(data["trend"])}
print(json.dumps(results, indent=2))

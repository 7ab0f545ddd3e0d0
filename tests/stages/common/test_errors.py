"""The error boundary every stage shares: one line, the cause's exit code, stops that clean up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

from tests.helpers import REPO

# Imported first by Python (the folder leads PYTHONPATH): holds TensorFlow's import open for 30 s, so
# a signal sent a second in lands inside `import tensorflow` however fast this machine imports it.
# The stop signals start at their defaults, as a shell in a terminal starts a command: a suite run in
# the background or under nohup would start the stage with SIGINT or SIGHUP ignored, and a stage
# rightly keeps ignoring those.
SLOW_TENSORFLOW = """
import importlib.abc, signal, sys, time

for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, signal.SIG_DFL)

class SlowTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow":
            print("importing tensorflow", file=sys.__stdout__, flush=True)
            time.sleep(30)
        return None

sys.meta_path.insert(0, SlowTensorFlow())
"""


def test_a_stage_stopped_while_importing_its_libraries_prints_one_line(tmp_path):
    """Ctrl-C or SIGTERM during `import tensorflow` printed a traceback from inside the import."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOW_TENSORFLOW)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        proc = subprocess.Popen([sys.executable, "-m", "stages.train", "--prepared", "p", "--model", "m", "--out", "o"],
                                cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{REPO}"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "importing tensorflow\n"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert err == "error: interrupted; outputs of this stage were not written\n", err


STAGE_LIKE = """
import sys, time
from stages.common.errors import run_main
def main():
    print("running", flush=True)
    time.sleep(60)
run_main(main)
"""

FLOW_LIKE = """
import subprocess, sys
from pipelines.dvcrepo import dvc_environment
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=dvc_environment(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
print(child.pid, flush=True)
child.wait()
"""


def test_a_stage_stops_once_the_flow_that_ran_it_is_killed(tmp_path):
    """kill -9 of the flow left the running stage's processes behind (dvc waits on them)."""
    flow = subprocess.Popen([sys.executable, "-c", FLOW_LIKE, STAGE_LIKE], cwd=REPO, stdout=subprocess.PIPE, text=True)
    stage = psutil.Process(int(flow.stdout.readline()))
    time.sleep(2)
    assert stage.is_running()
    flow.kill()
    flow.wait()
    stage.wait(timeout=15)  # the stage noticed within its polling interval and ended as on Ctrl-C

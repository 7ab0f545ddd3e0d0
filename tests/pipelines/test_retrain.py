"""Continuous training end to end: a scheduled retrain deployment on a work pool (a real Prefect
server and worker), a bare git repo as origin, moto's S3 as the DVC remote, the inference API
following `prod`, and a webhook receiver for the alerts. A fast scoring stage stands in for
training (tests.helpers.scored_project: more epochs, better scores) and an export stage copies a
small real ONNX export, its version naming the epochs."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from pipelines.alerts import AUTOMATION_NAME
from pipelines.dvcrepo import RemoteUnreachable
from pipelines.registry import fetch_origin_tags, stage_version
from pipelines.retrain import RETRAIN_ARTIFACT, RETRAIN_FLOW, changed_run_files, checkout_newest, commit_run
from stages.common.errors import CommandFailed, TransientError
from tests.helpers import (
    BIN,
    BUCKET,
    CREDENTIALS,
    ENV,
    REPO,
    api,
    cli,
    create_pool,
    dvc,
    free_port,
    inference_api,
    kill_tree,
    running_under,
    s3_remote,
    scored_project,
    set_params,
    start_worker,
    webhook_receiver,
)
from tests.synthetic import png_bytes

POOL = "retrain"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
PNG = png_bytes(np.full((32, 32, 3), (10, 120, 200), np.uint8))
PREP = '''"""Stands in for prepare; SLEEP makes it slow enough to kill a worker in the middle."""
import time
from pathlib import Path

SLEEP = {sleep}
time.sleep(SLEEP)
Path("data/prepared").mkdir(parents=True, exist_ok=True)
Path("data/prepared/rows.txt").write_text("400 rows\\n")
'''
EXPORTER = '''"""Stands in for export: the test's ONNX export, its version the epochs trained."""
import json
import shutil
import sys
from pathlib import Path

import yaml

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
shutil.copytree({exported!r}, out)
epochs = yaml.safe_load(Path("params.yaml").read_text())["train"]["epochs"]
signature = json.loads((out / "signature.json").read_text())
(out / "signature.json").write_text(json.dumps({{**signature, "version": f"epochs-{{epochs}}"}}))
'''


def git(cwd, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def retrain_project(root: Path, exported: Path, s3_url: str) -> Path:
    """The scoring project with a prepare stage before it and an export stage after it, the flow
    code (workers load the retrain flow from origin) and the S3 DVC remote."""
    dev = scored_project(root)
    declared = yaml.safe_load((dev / "dvc.yaml").read_text())
    evaluate = declared["stages"]["evaluate"]
    declared["stages"] = {
        "prepare": {"cmd": "python prep.py", "deps": ["prep.py"], "outs": ["data/prepared"]},
        "evaluate": {**evaluate, "deps": [*evaluate["deps"], "data/prepared"]},
        "export": {"cmd": "python exporter.py ${paths.exports}", "params": ["train.epochs"],
                   "deps": ["exporter.py", "${paths.evaluate}/metrics.json"], "outs": ["${paths.exports}"]},
    }
    (dev / "dvc.yaml").write_text(yaml.safe_dump(declared, sort_keys=False))
    (dev / "prep.py").write_text(PREP.format(sleep=0))
    (dev / "exporter.py").write_text(EXPORTER.format(exported=str(exported)))
    shutil.copytree(REPO / "pipelines", dev / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    set_params(dev / "params.yaml", train={"epochs": 2})
    dvc(dev, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    dvc(dev, "remote", "modify", "storage", "endpointurl", s3_url)
    return dev


def push_change(dev: Path, message: str, prep_sleep: float | None = None, **train) -> None:
    """A developer's commit to origin's main, on top of what the retrains pushed."""
    git(dev, "pull", "--quiet", "--rebase", "origin", "main")
    if train:
        set_params(dev / "params.yaml", train=train)
    if prep_sleep is not None:
        (dev / "prep.py").write_text(PREP.format(sleep=prep_sleep))
    git(dev, "add", "-A")
    git(dev, "commit", "--quiet", "-m", message)
    git(dev, "push", "--quiet", "origin", "main")


@pytest.fixture
def team(tmp_path, exported, prefect_api):
    s3 = s3_remote()
    env = {**os.environ, **CREDENTIALS, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / "client_home"),
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(origin))
    dev = retrain_project(tmp_path / "dev", exported, s3.url)
    git(dev, "add", "-A")
    git(dev, "commit", "--quiet", "-m", "the pipeline, no run yet")
    git(dev, "remote", "add", "origin", str(origin))
    git(dev, "push", "--quiet", "origin", "main")
    create_pool(POOL, env)
    # The worker's machine: no git identity, its own cache (the retrain keeps its clone there).
    worker_env = {**env, "HOME": str(tmp_path / "worker"), "XDG_CACHE_HOME": str(tmp_path / "worker" / "cache")}
    team = {"dev": dev, "origin": origin, "env": env, "worker_env": worker_env, "workers": [], "tmp": tmp_path}
    try:
        yield team
    finally:
        for worker in team["workers"]:
            if worker.poll() is None:
                kill_tree(worker)
        for automation in api(prefect_api, "POST", "/automations/filter", {}):
            if automation["name"] == AUTOMATION_NAME:  # the server is shared with later tests
                api(prefect_api, "DELETE", f"/automations/{automation['id']}")
        s3.stop()


def prod_on_origin(dev: Path) -> str | None:
    fetch_origin_tags(dev)
    found = stage_version(dev, "prod")
    return found.version if found else None


def wait_until(check, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval_s)
    return found


@pytest.mark.e2e
def test_scheduled_retrains_gate_promote_hot_swap_and_alert(team, prefect_api):
    dev, origin, env = team["dev"], team["origin"], team["env"]
    deployed = subprocess.run([str(BIN / "cifar10-pipeline"), "retrain", "--pool", POOL, "--cron", "0 2 * * *"],
                              cwd=dev, env=env, capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    print(deployed.stdout)
    deployment = api(prefect_api, "GET", f"/deployments/name/{RETRAIN_FLOW}/nightly")
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
    assert deployment["global_concurrency_limit"]["limit"] == 1  # a run waits while another runs
    team["workers"].append(start_worker(team["tmp"] / "worker", team["worker_env"], POOL))

    def scheduled_run() -> str:  # what the schedule does at 02:00, now
        return api(prefect_api, "POST", f"/deployments/{deployment['id']}/create_flow_run", {})["id"]

    def ended(run_id: str, timeout_s: float = 300) -> dict:
        return wait_until(lambda: (run := api(prefect_api, "GET", f"/flow_runs/{run_id}"))["state"]["type"] in FINAL
                          and run, timeout_s, f"flow run {run_id} to end")

    def what_it_did(run_id: str) -> str:
        found = api(prefect_api, "POST", "/artifacts/filter", {"artifacts": {
            "key": {"any_": [RETRAIN_ARTIFACT]}, "flow_run_id": {"any_": [run_id]}}})
        return found[0]["data"] if found else ""

    with webhook_receiver() as (hook, received):
        alerts = subprocess.run([str(BIN / "cifar10-pipeline"), "alerts", "--webhook", hook], env=env,
                                capture_output=True, text=True, timeout=120)
        assert alerts.returncode == 0 and RETRAIN_FLOW in alerts.stdout, alerts.stderr

        def alert(state: str) -> dict:
            return wait_until(lambda: next((a for a in received if a["subject"].endswith(f" is {state}")), None),
                              120, f"a '{state}' alert")

        # 1. Nothing in prod yet: the run trains, commits, promotes v0.0.1.
        first = ended(scheduled_run())
        assert first["state"]["type"] == "COMPLETED", first["state"]["message"]
        print("1.", what_it_did(first["id"]))
        assert prod_on_origin(dev) == "v0.0.1"
        assert git(origin, "log", "-1", "--format=%s", "main").startswith("retrain: the run of ")
        served = team["tmp"] / "served"
        git(team["tmp"], "clone", "--quiet", str(origin), str(served))
        with inference_api("--stage", "prod", "--poll", "0.5", "--repo", str(served), env=env) as (url, _):
            assert httpx.get(f"{url}/metadata").json()["version"] == "epochs-2"

            # 2. More epochs: only what changed reruns, the gate passes against v0.0.1, v0.0.2 is
            #    promoted, and the API switches while a client sends requests.
            answers: list[tuple[int, str | None]] = []
            stop = threading.Event()

            def client() -> None:
                with httpx.Client(timeout=30) as http:
                    while not stop.is_set():
                        response = http.post(f"{url}/predict", files=[("files", ("a.png", PNG))])
                        answers.append((response.status_code, response.json().get("version")))

            sender = threading.Thread(target=client)
            sender.start()
            push_change(dev, "more epochs", epochs=4)
            second = ended(scheduled_run())
            assert second["state"]["type"] == "COMPLETED", second["state"]["message"]
            did = what_it_did(second["id"])
            print("2.", did)
            assert "prepare: up to date" in did and "evaluate: ran" in did and "export: ran" in did
            assert "Quality gate passed" in did and "promoted cifar10-classifier v0.0.2" in did
            wait_until(lambda: httpx.get(f"{url}/metadata").json()["version"] == "epochs-4", 60, "the switch")
            time.sleep(1)
            stop.set()
            sender.join()
            versions = [version for _, version in answers]
            switched = versions.index("epochs-4")
            print(f"MEASURE API during the switch: {len(answers)} requests, "
                  f"{sum(status != 200 for status, _ in answers)} failed, {switched} answered by epochs-2, "
                  f"then {len(versions) - switched} by epochs-4")
            assert all(status == 200 for status, _ in answers)
            assert set(versions[:switched]) == {"epochs-2"} and set(versions[switched:]) == {"epochs-4"}

            # 3. A worse model: the gate fails, prod stays v0.0.2, the webhook gets the verdict.
            push_change(dev, "fewer epochs", epochs=1)
            third = ended(scheduled_run())
            assert third["state"]["type"] == "FAILED", third["state"]["message"]
            assert "quality gate failed: accuracy dropped by" in third["state"]["message"]
            failed = alert("Failed")
            print("3. webhook:", failed)
            assert failed["subject"] == f"{RETRAIN_FLOW}: flow run {third['name']} is Failed"
            assert "quality gate failed: accuracy dropped by" in failed["body"]
            assert "Nothing promoted" in what_it_did(third["id"])
            assert prod_on_origin(dev) == "v0.0.2"
            received.clear()

            # 4. A bad param: the run fails with its one line before any stage runs, nothing is
            #    committed, the webhook gets the line; prod and the API stay as they were.
            push_change(dev, "a typo", epochs=0)
            main_before = git(origin, "rev-parse", "main")
            fourth = ended(scheduled_run())
            assert fourth["state"]["type"] == "FAILED", fourth["state"]["message"]
            failed = alert("Failed")
            print("4. webhook:", failed)
            assert "train.epochs" in failed["body"], failed["body"]
            assert git(origin, "rev-parse", "main") == main_before and prod_on_origin(dev) == "v0.0.2"
            assert httpx.get(f"{url}/metadata").json()["version"] == "epochs-4"
            received.clear()

            # 5. The worker's machine dies mid-run: its heartbeats stop, the run ends Crashed and the
            #    webhook says so; the next scheduled run, with no worker up, is Late and says so too;
            #    the worker back (same machine, same clone), it runs and promotes v0.0.3.
            push_change(dev, "fixed, a slow prepare", prep_sleep=600, epochs=5)
            fifth = scheduled_run()
            worker = team["workers"][0]
            wait_until(lambda: running_under(worker, "prep.py"), 120, "prepare to start")
            kill_tree(worker)
            sixth = scheduled_run()
            late = alert("Late")
            print("5. webhook:", late)
            assert "no worker has started it" in late["body"], late["body"]
            crashed_run = ended(fifth, 120)
            assert crashed_run["state"]["type"] == "CRASHED", crashed_run["state"]["message"]
            crashed = alert("Crashed")
            print("5. webhook:", crashed)
            assert crashed["subject"] == f"{RETRAIN_FLOW}: flow run {crashed_run['name']} is Crashed"
            push_change(dev, "prepare fast again", prep_sleep=0)
            team["workers"].append(start_worker(team["tmp"] / "worker", team["worker_env"], POOL))
            next_run = ended(sixth)
            assert next_run["state"]["type"] == "COMPLETED", next_run["state"]["message"]
            print("5.", what_it_did(sixth))
            assert prod_on_origin(dev) == "v0.0.3"
            wait_until(lambda: httpx.get(f"{url}/metadata").json()["version"] == "epochs-5", 60, "the API on v0.0.3")

            # 6. No change on origin: a no-op that says so, nothing committed or promoted.
            main_before = git(origin, "rev-parse", "main")
            seventh = ended(scheduled_run())
            assert seventh["state"]["type"] == "COMPLETED", seventh["state"]["message"]
            did = what_it_did(seventh["id"])
            print("6.", did)
            print(f"MEASURE no-op retrain: {seventh['total_run_time']:.1f} s of flow run "
                  f"({did.rsplit('(', 1)[-1].rstrip(')')} in the flow)")
            assert did.startswith("No change: origin's main at ")
            assert git(origin, "rev-parse", "main") == main_before and prod_on_origin(dev) == "v0.0.3"


def test_retrain_needs_origin_a_dvc_remote_and_a_server(tmp_path):
    repo = scored_project(tmp_path / "project")
    env = {key: value for key, value in ENV.items() if key != "PREFECT_API_URL"}
    no_origin = cli(env, "retrain", "--repo", str(repo))
    assert no_origin.returncode == 2 and no_origin.stderr.count("\n") == 1, no_origin.stderr
    assert no_origin.stderr.startswith("error: no git remote 'origin'")
    git(repo, "remote", "add", "origin", str(tmp_path / "origin.git"))
    dvc(repo, "remote", "add", "-d", "storage", str(tmp_path / "storage"))
    no_server = cli(env, "retrain", "--repo", str(repo))
    assert no_server.returncode == 2, no_server.stderr
    assert no_server.stderr == ("error: scheduled retraining needs a Prefect server: set PREFECT_API_URL "
                                "(see docs/scaling.md)\n")


def test_an_origin_that_cannot_be_reached_is_a_transient_error_and_one_not_there_is_not(tmp_path):
    down = f"http://127.0.0.1:{free_port()}/origin.git"  # a port nobody serves: a server down
    with pytest.raises(RemoteUnreachable, match=r"^git clone .*: origin cannot be reached \(.+\); rerun when it is up$"):
        checkout_newest(down, "main", tmp_path / "retrain")
    gone = tmp_path / "gone.git"  # a mistyped path: rerunning will not help
    with pytest.raises(CommandFailed, match=rf"^git clone {gone}: fatal: repository '{gone}' does not exist$"):
        checkout_newest(str(gone), "main", tmp_path / "retrain")
    assert not (tmp_path / "retrain").exists()
    origin, work = tmp_path / "origin.git", tmp_path / "work"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(origin))
    git(tmp_path, "clone", "--quiet", str(origin), str(work))
    git(work, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "--quiet", "--allow-empty", "-m", "first")
    git(work, "push", "--quiet", "origin", "main")
    checkout_newest(str(origin), "main", tmp_path / "retrain")
    origin.rename(gone)  # origin moved: the next fetch fails the same way at every rerun
    with pytest.raises(CommandFailed, match=rf"^git fetch origin main: fatal: '{origin}' does not appear to be a git repository$"):
        checkout_newest(str(origin), "main", tmp_path / "retrain")


def test_a_run_origin_moved_past_is_not_pushed_and_says_why(tmp_path):
    origin = tmp_path / "origin.git"
    git(tmp_path, "init", "--quiet", "--bare", "-b", "main", str(origin))
    dev = scored_project(tmp_path / "dev")
    git(dev, "add", "-A")
    git(dev, "commit", "--quiet", "-m", "the pipeline")
    git(dev, "remote", "add", "origin", str(origin))
    git(dev, "push", "--quiet", "origin", "main")
    clone = tmp_path / "retrain"
    started_at = checkout_newest(str(origin), "main", clone)
    dvc(clone, "repro", "-q")  # the retrain's run ...
    (dev / "NOTES.md").write_text("meanwhile\n")  # ... while a developer pushes
    git(dev, "add", "-A")
    git(dev, "commit", "--quiet", "-m", "meanwhile")
    git(dev, "push", "--quiet", "origin", "main")
    assert changed_run_files(clone) and "dvc.lock" in changed_run_files(clone)
    with pytest.raises(TransientError, match=rf"^the run of {started_at[:7]} could not be pushed to origin's main "):
        commit_run(clone, "main", started_at)
    assert git(origin, "log", "-1", "--format=%s", "main") == "meanwhile"
    # The next run starts from origin's newest commit; what the failed one left is gone.
    assert checkout_newest(str(origin), "main", clone) == git(origin, "rev-parse", "main")
    assert git(clone, "status", "--porcelain") == ""

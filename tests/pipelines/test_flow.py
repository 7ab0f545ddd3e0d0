"""The Prefect flow against a real Prefect server and real DVC repos on generated data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from tests.helpers import (
    BIN,
    DIVERGES,
    STAGES,
    api,
    cli,
    copy_repo,
    dvc,
    git_dvc_project,
    not_blank,
    set_params,
    sha256_of,
    tiny_params,
    visit,
)

pytestmark = pytest.mark.e2e


def stage_lines(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines() if line.split(":")[0] in
                STAGES)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, tiny_archive, prefect_api):
    """A repo the flow ran once from scratch, and that run's CLI result."""
    import os

    repo = git_dvc_project(tmp_path_factory.mktemp("flow") / "project")
    set_params(repo / "params.yaml", **tiny_params(tiny_archive))
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(tmp_path_factory.mktemp("client_home"))}
    return repo, cli(env, "run", "--repo", str(repo))


@pytest.fixture
def flow_project(first_run, tmp_path):
    """Each test gets its own copy of the built repo: no test depends on what another changed."""
    return copy_repo(first_run[0], tmp_path / "project")


def test_flow_runs_then_finds_everything_up_to_date(first_run, flow_project, prefect_env, prefect_api):
    first = first_run[1]
    assert first.returncode == 0, first.stderr
    assert set(stage_lines(first.stdout)) == STAGES
    assert all(v.startswith("ran") for v in stage_lines(first.stdout).values())
    second = cli(prefect_env, "run", "--repo", str(flow_project))
    assert second.returncode == 0, second.stderr
    assert set(stage_lines(second.stdout).values()) == {"up to date"}
    assert f"report page: {flow_project / 'results/report/report.html'}" in second.stdout.splitlines()
    runs = api(prefect_api, "POST", "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}})
    assert len(runs) >= 2
    artifacts = api(prefect_api, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": ["cifar10-report", "cifar10-metrics"]}}})
    assert {a["key"] for a in artifacts} == {"cifar10-report", "cifar10-metrics"}
    assert any("Accuracy" in (a.get("data") or "") for a in artifacts if a["key"] == "cifar10-report")
    # Training shows its epochs while it runs: a progress artifact and a log line per epoch.
    progress = api(prefect_api, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": ["cifar10-train-progress"]}}})
    assert [a["type"] for a in progress][:1] == ["progress"] and any(a["data"] == 100.0 for a in progress), progress
    assert any(a["description"].startswith("train: epoch 1/1, loss ") for a in progress), progress
    assert "train: epoch 1/1, loss " in first.stdout + first.stderr


def test_the_prefect_ui_shows_the_run_and_its_report_artifact(first_run, prefect_api, tmp_path):
    """The Prefect UI of the test server, opened in Chromium: the flow run's page, then the report."""
    assert first_run[1].returncode == 0, first_run[1].stderr
    runs = api(prefect_api, "POST", "/flow_runs/filter", {"sort": "START_TIME_ASC", "limit": 200})
    run = next(r for r in runs if r["parameters"].get("repo_dir") == str(first_run[0]))
    ui = prefect_api.removesuffix("/api")
    page = visit(f"{ui}/runs/flow-run/{run['id']}", tmp_path / "run", wait_for_text=run["name"])
    assert run["name"] in page.text and "Completed" in page.text and not_blank(page.screenshot)
    (report,) = api(prefect_api, "POST", "/artifacts/filter", {"artifacts": {
        "key": {"any_": ["cifar10-report"]}, "flow_run_id": {"any_": [run["id"]]}}})
    artifact = visit(f"{ui}/artifacts/artifact/{report['id']}", tmp_path / "artifact", wait_for_text="Accuracy")
    assert "cifar10-report" in artifact.text and "Accuracy" in artifact.text and not_blank(artifact.screenshot)


def test_predict_any_image_size_and_mode(flow_project, prefect_env, tmp_path):
    from PIL import Image

    Image.new("L", (100, 60), 90).save(tmp_path / "gray.png")
    Image.new("RGBA", (16, 16), (200, 10, 10, 128)).save(tmp_path / "small.png")
    (tmp_path / "notes.txt").write_text("not an image")
    classes = json.loads((flow_project / "data/prepared/classes.json").read_text())
    args = ["--repo", str(flow_project), "--top-k", "2"]  # the pipeline's export, found through dvc.yaml
    result = cli(prefect_env, "predict", str(tmp_path / "gray.png"), str(tmp_path / "small.png"), *args)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2
    for line in result.stdout.splitlines():
        _path, rest = line.split(": ")
        ranked = [(label, float(p.rstrip(")"))) for label, p in (item.split(" (") for item in rest.split(", "))]
        assert len(ranked) == 2 and all(label in classes for label, _ in ranked)
        assert 1.0 >= ranked[0][1] >= ranked[1][1] >= 0.0
    # One unreadable file is named and skipped; the others are still predicted (exit 2 says so).
    mixed = cli(prefect_env, "predict", str(tmp_path / "notes.txt"), str(tmp_path / "gray.png"), *args)
    assert mixed.returncode == 2 and mixed.stdout.startswith(f"{tmp_path / 'gray.png'}: "), mixed.stderr
    assert mixed.stderr.strip().splitlines()[-1].startswith(
        f"error: 1 image(s) could not be read and were skipped, the first: {tmp_path / 'notes.txt'} is not a readable")
    # A folder stands for the images in it.
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("gray.png", "small.png", "notes.txt"):
        shutil.copy(tmp_path / name, photos / name)
    folder = cli(prefect_env, "predict", str(photos), *args)
    assert folder.returncode == 0 and len(folder.stdout.splitlines()) == 2, folder.stderr
    nowhere = cli(prefect_env, "predict", "--model", str(tmp_path / "nope"), str(tmp_path / "gray.png"))
    assert nowhere.returncode == 2 and nowhere.stderr.startswith(f"error: --model {tmp_path / 'nope'} is not a folder")
    export = tmp_path / "export"
    shutil.copytree(flow_project / "models/export", export)
    (export / "signature.json").write_text(json.dumps({"version": "x"}))
    unsigned = cli(prefect_env, "predict", "--model", str(export), str(tmp_path / "gray.png"))
    assert unsigned.returncode == 3 and unsigned.stderr.startswith(f"error: {export / 'signature.json'} has no 'classes'")


def test_run_without_a_server_uses_a_temporary_api_whose_runs_the_project_keeps(flow_project):
    import sqlite3

    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_API_URL", "PREFECT_HOME")}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    result = cli(env, "run", "--repo", str(flow_project))
    assert result.returncode == 0, result.stderr
    assert set(stage_lines(result.stdout).values()) == {"up to date"}
    # The run is in the project's .prefect database, which `cifar10-pipeline server` serves; git ignores it.
    with sqlite3.connect(flow_project / ".prefect" / "prefect.db") as db:
        assert db.execute("select count(*) from flow_run").fetchone()[0] == 1
        logs = db.execute("select count(*) from log").fetchone()[0]
    assert logs > 0 and "Error logging to API" not in result.stderr  # its logs sent before it stopped
    assert "Starting temporary server" not in result.stderr  # one API: Prefect started none of its own
    assert "telemetry" not in result.stderr
    status = subprocess.run(["git", "status", "--porcelain"], cwd=flow_project, capture_output=True, text=True)
    assert ".prefect" not in status.stdout


def test_dry_run_prints_the_plan_and_changes_nothing(flow_project, prefect_env):
    before = (flow_project / "params.yaml").read_text()
    result = cli(prefect_env, "run", "--repo", str(flow_project), "--dry-run", "--set", "train.epochs=3")
    assert result.returncode == 0, result.stderr
    plan = stage_lines(result.stdout)
    assert plan["train"] == "will run: param train: train.epochs 1 -> 3"
    assert plan["download"] == "up to date" and plan["evaluate"].startswith("may run")
    assert (flow_project / "params.yaml").read_text() == before


def test_train_override_reruns_train_and_downstream_as_an_experiment(flow_project, prefect_env):
    result = cli(prefect_env, "run", "--repo", str(flow_project), "--set", "train.epochs=2")
    assert result.returncode == 0, result.stderr
    lines = stage_lines(result.stdout)
    assert {s for s, v in lines.items() if v.startswith("ran")} == {"train", "evaluate", "export", "report"}
    experiment = next(line.split(": ")[1] for line in result.stdout.splitlines() if line.startswith("experiment: "))
    shown = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=flow_project, capture_output=True, text=True)
    assert experiment in shown.stdout
    assert yaml.safe_load((flow_project / "params.yaml").read_text())["train"]["epochs"] == 2
    status = cli(prefect_env, "status", "--repo", str(flow_project))
    assert status.returncode == 0 and set(stage_lines(status.stdout).values()) == {"up to date"}
    compared = cli(prefect_env, "compare", experiment, "--repo", str(flow_project))
    assert compared.returncode == 0, compared.stderr
    assert "## Metrics" in compared.stdout and "Verdict: difference within noise (p=1)" in compared.stdout
    unknown = cli(prefect_env, "compare", "no-such-rev", "--repo", str(flow_project))
    assert unknown.returncode == 2  # a bad argument
    assert unknown.stderr.strip() == ("error: 'no-such-rev' is neither a git revision nor a DVC experiment here; "
                                      "see `git log` and `dvc exp show`")


def test_unknown_override_is_one_clear_line(flow_project, prefect_env):
    result = cli(prefect_env, "run", "--repo", str(flow_project), "--set", "train.epoch=2")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: override 'train.epoch' names no key in params.yaml; did you mean 'train.epochs'?"


def test_concurrent_runs_wait_or_are_refused(flow_project, prefect_env):
    set_params(flow_project / "params.yaml", report={"dpi": 55})
    first = subprocess.Popen([str(BIN / "cifar10-pipeline"), "run", "--repo", str(flow_project), "--set", "train.seed=7"],
                             env=prefect_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = flow_project / ".dvc/tmp/cifar10-flow.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().startswith("flow run")) and time.monotonic() < deadline:
        time.sleep(0.5)
    refused = cli(prefect_env, "run", "--repo", str(flow_project), "--lock-timeout", "0")
    waited = cli(prefect_env, "run", "--repo", str(flow_project), "--lock-timeout", "600")
    _out, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert refused.returncode == 75 and "is running the pipeline" in refused.stderr  # busy: worth a retry
    assert "--lock-timeout SECONDS" in refused.stderr  # the option the user has, not the flow's parameter
    assert waited.returncode == 0, waited.stderr
    assert set(stage_lines(waited.stdout).values()) == {"up to date"}
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=flow_project, capture_output=True, text=True)
    assert "up to date" in status.stdout


def test_failing_validation_fails_the_flow_and_skips_training(tmp_path, tiny_archive, prefect_env, prefect_api):
    repo = git_dvc_project(tmp_path / "project")
    params = tiny_params(tiny_archive)
    params["validate"] = {"expected_per_class": {"train": 21, "test": 5}}
    set_params(repo / "params.yaml", **params)
    result = cli(prefect_env, "run", "--repo", str(repo))
    assert result.returncode == 3  # validate's own exit code: invalid data
    assert result.stderr.strip().splitlines()[-1].startswith("error: validate failed: validation failed: 1 of")
    assert not (repo / "models/model.keras").exists()
    runs = api(prefect_api, "POST", "/flow_runs/filter",
               {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 1})
    tasks = api(prefect_api, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [runs[0]["id"]]}}})
    assert {t["name"] for t in tasks} == {"download", "prepare", "validate"}


def test_scheduled_deployment_runs_by_itself_and_on_demand(flow_project, prefect_env, prefect_api):
    serve = subprocess.Popen(
        [str(BIN / "cifar10-pipeline"), "serve", "--cron", "* * * * *", "--name", "every-minute", "--repo", str(flow_project)],
        env=prefect_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        deployment = None
        while deployment is None and time.monotonic() < deadline:
            found = api(prefect_api, "POST", "/deployments/filter", {"deployments": {"name": {"any_": ["every-minute"]}}})
            deployment = found[0] if found else None
            time.sleep(1)
        assert deployment is not None, "deployment was not created"
        assert deployment["schedules"][0]["schedule"]["cron"] == "* * * * *"
        upcoming = []
        while not upcoming and time.monotonic() < deadline:
            upcoming = api(prefect_api, "POST", "/flow_runs/filter",
                           {"deployments": {"id": {"any_": [deployment["id"]]}}, "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}}})
            time.sleep(1)
        assert upcoming, "the scheduler created no upcoming runs"

        manual = api(prefect_api, "POST", f"/deployments/{deployment['id']}/create_flow_run", {})
        finished = wait_for_runs(prefect_api, deployment["id"], lambda r: r["id"] == manual["id"], timeout=300)
        assert finished["state_type"] == "COMPLETED"
        scheduled = wait_for_runs(prefect_api, deployment["id"], lambda r: r["auto_scheduled"], timeout=240)
        assert scheduled["state_type"] == "COMPLETED"
        # `status` shows the server's side too: the deployment, its schedule, the last runs.
        status = json.loads(cli(prefect_env, "status", "--json", "--repo", str(flow_project)).stdout)
        assert {"deployment": "cifar10-pipeline/every-minute", "schedules": "cron * * * * *", "paused": "no",
                "pool": "served by a process (flow.serve)"} in status["deployments"]
        assert any(run["flow run"].startswith("cifar10-pipeline/") and run["state"] == "Completed"
                   for run in status["flow_runs"]), status["flow_runs"]
    finally:
        import os
        import signal

        if deployment is not None:  # no more scheduled runs, whatever the runner does on its way out
            api(prefect_api, "DELETE", f"/deployments/{deployment['id']}")
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)


def wait_for_runs(url: str, deployment_id: str, match, timeout: float) -> dict:
    """The first run of the deployment matching `match` that reached a final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api(url, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
        done = [r for r in runs if match(r) and r["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        if done:
            return done[0]
        time.sleep(2)
    raise AssertionError(f"no matching run finished within {timeout} s: {json.dumps(runs)[:2000]}")


def test_stage_timeout_stops_the_stage_process_group(tmp_path, tiny_archive, prefect_env):
    import psutil

    flow_project = git_dvc_project(tmp_path / "project")  # its own repo: no other run can touch it
    set_params(flow_project / "params.yaml", **tiny_params(tiny_archive))
    assert cli(prefect_env, "run", "--repo", str(flow_project)).returncode == 0
    train_lock = lambda: yaml.safe_load((flow_project / "dvc.lock").read_text())["stages"]["train"]
    lock_before = train_lock()
    # 300 epochs cannot finish in 4 s, so the timeout always strikes mid-training.
    result = cli(prefect_env, "run", "--repo", str(flow_project), "--set", "train.epochs=300", "--stage-timeout",
                 "train=4")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: train failed: timed out after 4 s; stopped it (raise its stage timeout); its previous outputs were put back"
    )
    assert (flow_project / "models/model.keras").is_file()
    # No grace period: the flow returns only once the stage's process group is gone.
    leftovers = [p for p in psutil.process_iter(["cmdline", "cwd"])
                 if p.info["cwd"] == str(flow_project) and "stages.train" in " ".join(p.info["cmdline"] or [])]
    assert leftovers == []
    assert train_lock() == lock_before


def test_a_run_cache_restore_reruns_what_depends_on_it_and_leaves_nothing_stale(flow_project, prefect_env,
                                                                                 tiny_archive, tmp_path):
    """The issue's reproduction: another copy of the data, then the first again (download restored
    from DVC's run-cache): the stages below must follow, not be called up to date."""
    import tarfile

    other = tmp_path / "recompressed.tar.gz"
    with tarfile.open(tiny_archive) as src, tarfile.open(other, "w:gz", compresslevel=1) as dst:
        for member in src:
            dst.addfile(member, src.extractfile(member))
    assert sha256_of(other) != sha256_of(tiny_archive)
    for archive in (other, tiny_archive):
        result = cli(prefect_env, "run", "--repo", str(flow_project), "--set", f"download.source={archive}",
                     "--set", f"download.sha256={sha256_of(archive)}")
        assert result.returncode == 0, result.stderr[-3000:]
    lines = stage_lines(result.stdout)
    assert lines["download"] == "restored from run-cache" and lines["prepare"] == "restored from run-cache"
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=flow_project, capture_output=True, text=True)
    assert "Data and pipelines are up to date" in status.stdout, status.stdout
    manifest = json.loads((flow_project / "data/raw/manifest.json").read_text())
    assert manifest["sha256"] == sha256_of(tiny_archive)


@pytest.mark.parametrize("code, sets, message", [
    # Found before the stages ahead of train run, not by train after them.
    (2, ["train.require_gpu=true"], "error: train.require_gpu is true but TensorFlow sees no GPU"),
    (3, ['validate.expected_per_class={"train": 21, "test": 5}'], "error: validate failed: validation failed: 1 of"),
    (4, [f"download.sha256={'ab' * 32}"], "error: download failed: sha256 mismatch"),
    (5, [f"train.{key}={json.dumps(value)}" for key, value in DIVERGES.items()], "error: train failed: training "),
    # Connection refused is transient: the download task retries it (3 times, backing off) first.
    (75, ["download.source=http://127.0.0.1:9/cifar.tar.gz"], "error: download failed: "),
])
def test_run_exits_with_the_failing_stages_own_code(flow_project, prefect_env, code, sets, message):
    before = (flow_project / "params.yaml").read_bytes()
    result = cli(prefect_env, "run", "--repo", str(flow_project), *[a for s in sets for a in ("--set", s)])
    assert result.returncode == code, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]  # Prefect logged two, ~40 lines, before
    # The failing stage changed no output, so the run leaves params.yaml as it found it.
    assert (flow_project / "params.yaml").read_bytes() == before
    # DVC deleted the failing stage's outputs before running it; the flow put them back.
    lock = yaml.safe_load((flow_project / "dvc.lock").read_text())["stages"]
    missing = [out["path"] for entry in lock.values() for out in entry.get("outs", [])
               if not (flow_project / out["path"]).exists()]
    assert missing == [], missing
    assert "Data and pipelines are up to date" in dvc(flow_project, "status").stdout
    if code == 75:
        assert result.stderr.count("Retry") >= 3, result.stderr[-3000:]


def test_ctrl_c_stops_the_run_and_its_stage_with_130(flow_project, prefect_env):
    import psutil

    from pipelines.dvcrepo import with_default_sigint

    run = subprocess.Popen(with_default_sigint([str(BIN / "cifar10-pipeline"), "run", "--repo", str(flow_project),
                                                "--set", "train.epochs=300"]),
                           env=prefect_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)

    def training() -> list:
        return [p for p in psutil.process_iter(["cmdline", "cwd"])
                if p.info["cwd"] == str(flow_project) and "stages.train" in " ".join(p.info["cmdline"] or [])]

    deadline = time.monotonic() + 300
    while not training() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.5)
    assert training(), "training never started"
    time.sleep(3)  # mid-epoch
    os.killpg(run.pid, signal.SIGINT)  # Ctrl-C at a terminal: the CLI's process group
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == "error: interrupted"
    assert training() == []


def test_overrides_are_checked_in_full_before_anything_runs(flow_project, prefect_env):
    before = (flow_project / "params.yaml").read_bytes()
    for sets, message in [
        (["train.epochs=0"], "error: params.yaml: 'train.epochs' is 0; it must be >= 1"),
        (["train.model=tutorial_cnn", 'train.arch={"tutorial_cnn": {"widths": [32, 64, 64, 64]}}'],
         "error: params.yaml: train.arch.tutorial_cnn {'widths': [32, 64, 64, 64]} does not build a tutorial_cnn"),
    ]:
        result = cli(prefect_env, "run", "--repo", str(flow_project), *[a for s in sets for a in ("--set", s)])
        assert result.returncode == 2 and result.stderr.startswith(message), result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1
        assert (flow_project / "params.yaml").read_bytes() == before
    # 1e-3 is a number (YAML 1.2, as DVC reads it), not the string '1e-3'.
    planned = cli(prefect_env, "run", "--repo", str(flow_project), "--dry-run", "--set", "train.learning_rate=1e-3")
    assert planned.returncode == 0, planned.stderr
    learning_rate = yaml.safe_load((flow_project / "params.yaml").read_text())["train"]["learning_rate"]
    assert stage_lines(planned.stdout)["train"] == f"will run: param train: train.learning_rate {learning_rate} -> 0.001"


def test_a_hand_typed_key_stops_the_run_before_any_stage_and_loses_nothing(flow_project, prefect_env):
    params = flow_project / "params.yaml"
    params.write_text(params.read_text().replace("  batch_size: 32", "  batch_size: 32\n  batchsize: 32"))
    model = (flow_project / "models/model.keras").read_bytes()
    result = cli(prefect_env, "run", "--repo", str(flow_project))
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: unknown key 'train.batchsize'; did you mean 'train.batch_size'?"]
    assert (flow_project / "models/model.keras").read_bytes() == model
    status = cli(prefect_env, "status", "--repo", str(flow_project))  # refused the same way
    assert (status.returncode, status.stderr) == (result.returncode, result.stderr)


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
def test_a_stopped_run_leaves_no_stage_or_temporary_server_behind(flow_project, tmp_path, stop):
    """SIGTERM (a service manager's stop) ended `run` with 143 and no error line, leaving Prefect's
    temporary API running with parent 1; kill -9 left that and the running stage's processes."""
    import psutil

    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update(PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}", PREFECT_HOME=str(tmp_path / "home"))
    model = (flow_project / "models/model.keras").read_bytes()
    run = subprocess.Popen([str(BIN / "cifar10-pipeline"), "run", "--repo", str(flow_project),
                            "--set", "train.epochs=300"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    cli_process = psutil.Process(run.pid)

    def training() -> bool:
        return any("stages.train" in " ".join(p.cmdline()) for p in cli_process.children(recursive=True))

    deadline = time.monotonic() + 300
    while run.poll() is None and time.monotonic() < deadline and not training():
        time.sleep(0.5)
    assert training(), "training never started"
    started = cli_process.children(recursive=True)  # the temporary API, dvc, the stage
    time.sleep(3)  # mid-epoch
    run.send_signal(getattr(signal, stop))  # to the CLI alone, as a service manager or container runtime does
    _, err = run.communicate(timeout=120)
    if stop == "SIGTERM":
        assert run.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", err[-3000:]
        assert (flow_project / "models/model.keras").read_bytes() == model  # put back after DVC deleted it
    _, alive = psutil.wait_procs(started, timeout=60)
    assert alive == [], [p.cmdline() for p in alive]

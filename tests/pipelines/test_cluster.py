"""The pipeline scaled out on one machine: a Prefect server, a bare git repo as origin, a moto S3
server as the DVC remote, a process work pool with two workers in their own empty folders (they
share nothing but the remotes), a killed worker, and the S3 server down during a push."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

from pipelines.runs import experiment_commit
from stages.common.paths import RUN_INFO, artifact_paths
from tests.helpers import (
    BIN,
    BUCKET,
    CREDENTIALS,
    REPO,
    api,
    create_pool,
    dvc,
    free_port,
    git_dvc_project,
    kill_tree,
    prefect_server,
    running_under,
    s3_remote,
    set_params,
    start_worker,
    tiny_params,
)

pytestmark = pytest.mark.e2e
POOL = "cpu"


def git(cwd, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid", *args], cwd=cwd,
                          check=True, capture_output=True, text=True).stdout


def flow_runs(prefect_api: str, tag: str | None = None) -> list[dict]:
    body = {"flows": {"name": {"any_": ["cifar10-experiment"]}}}
    if tag:
        body["flow_runs"] = {"tags": {"all_": [tag]}}
    return api(prefect_api, "POST", "/flow_runs/filter", json=body)


def remote_experiments(origin) -> set[str]:
    return {line.split("/")[-1] for line in git(origin, "for-each-ref", "--format=%(refname)", "refs/exps").split()}


def shared_project(root, source_url: str, params: dict, s3_url: str):
    """A bare git repo as origin and a developer's clone holding the project (pipeline, flow code,
    data source over HTTP, the S3 DVC remote with verify on), pushed: what workers clone."""
    origin = root / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True)
    dev = git_dvc_project(root / "dev")
    shutil.copytree(REPO / "pipelines", dev / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    params["download"]["source"] = source_url  # over HTTP: the workers share no files
    set_params(dev / "params.yaml", **params)
    dvc(dev, "remote", "add", "-d", "storage", f"s3://{BUCKET}/dvc")
    dvc(dev, "remote", "modify", "storage", "endpointurl", s3_url)
    dvc(dev, "remote", "modify", "storage", "verify", "true")
    git(dev, "add", "-A")
    git(dev, "commit", "-qm", "data source, S3 remote, flow code")
    git(dev, "remote", "add", "origin", str(origin))
    git(dev, "push", "-q", "origin", "main")
    return origin, dev


POSTGRES_BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))  # Debian's postgresql package


def as_postgres(*command: str) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run it as Debian's `postgres` user."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else list(command)


@contextlib.contextmanager
def postgresql() -> Iterator[str | None]:
    """Debian's PostgreSQL on 127.0.0.1 in a temporary folder, with a `prefect` database: yields
    its SQLAlchemy URL, or None where the package is not installed (then the server uses SQLite)."""
    if not POSTGRES_BIN:
        yield None
        return
    bin_dir = POSTGRES_BIN[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="cifar10-pg-"))  # not under pytest's root-only tmp: postgres reads it
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    port = free_port()
    data = folder / "data"
    try:
        subprocess.run(as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust",
                                   "-E", "UTF8"), check=True, capture_output=True)
        subprocess.run(as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
                                   f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"),
                       check=True, capture_output=True)
        subprocess.run(as_postgres(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "prefect",
                                   "prefect"), check=True, capture_output=True)
        yield f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect"
    finally:
        subprocess.run(as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"), capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def team_prefect_api(tmp_path_factory):
    """The Prefect server a team runs: on PostgreSQL where Debian's package is installed (several
    workers lock SQLite), else on SQLite; the test's output says which."""
    with postgresql() as database_url:
        print(f"MEASURE Prefect server database: {'PostgreSQL' if database_url else 'SQLite (no postgresql package)'}")
        with prefect_server(tmp_path_factory.mktemp("team_prefect_home"), database_url) as url:
            yield url
        if database_url:  # the runs are in PostgreSQL, not in a SQLite file beside it
            port = database_url.rsplit(":", 1)[1].split("/")[0]
            psql = subprocess.run(as_postgres(str(POSTGRES_BIN[-1].parent / "psql"), "-h", "127.0.0.1", "-p", port,
                                              "-U", "prefect", "-tAc", "select count(*) from flow_run", "prefect"),
                                  capture_output=True, text=True, check=True)
            print(f"MEASURE flow runs in PostgreSQL: {psql.stdout.strip()}")
            assert int(psql.stdout) > 0


@pytest.fixture
def cluster(tmp_path, http_server, tiny_archive, team_prefect_api):
    """origin, the S3 remote, a developer's clone with the project, the pool and two workers."""
    s3 = s3_remote()
    env = {**os.environ, "PREFECT_API_URL": team_prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PREFECT_HOME": str(tmp_path / "client_home"), **CREDENTIALS, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    www, base_url = http_server
    shutil.copy(tiny_archive, www / "tiny.tar.gz")
    origin, dev = shared_project(tmp_path, f"{base_url}/tiny.tar.gz", tiny_params(tiny_archive), s3.url)
    create_pool(POOL, env)
    workers = [start_worker(tmp_path / f"worker{i}", env, POOL) for i in (1, 2)]
    yield {"s3": s3, "origin": origin, "dev": dev, "env": {**env, "PWD": str(dev)}, "workers": workers,
           "tmp": tmp_path, "api": team_prefect_api}
    for proc in workers:
        if proc.poll() is None:
            kill_tree(proc)
    s3.stop()


def run_in(cwd, env: dict, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cifar10-pipeline"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


# The suite's longest test: a limit of its own, so a slow machine under load still finishes it.
@pytest.mark.timeout(1800)
def test_pipeline_and_sweep_on_a_work_pool_share_only_git_and_s3(cluster):
    dev, origin, env, s3, prefect_api = cluster["dev"], cluster["origin"], cluster["env"], cluster["s3"], cluster["api"]

    # 1. A worker dies mid-training: the run ends Crashed once its heartbeats stop (which frees its
    #    slot), and pushes nothing. 2. Meanwhile a retry runs on the surviving worker; its
    #    experiment comes back through origin and S3.
    started = subprocess.Popen([str(BIN / "cifar10-pipeline"), "run", "--pool", POOL, "-S", "train.epochs=30"],
                               cwd=dev, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    victim = None
    while victim is None and time.monotonic() < deadline and started.poll() is None:
        victim = next((w for w in cluster["workers"] if running_under(w, "stages.train")), None)
        time.sleep(1)
    assert victim is not None, started.communicate()
    kill_tree(victim)
    killed_at = time.monotonic()
    retry = subprocess.Popen([str(BIN / "cifar10-pipeline"), "run", "--pool", POOL, "-S", "train.learning_rate=0.002"],
                             cwd=dev, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = started.communicate(timeout=600)
    freed_s = time.monotonic() - killed_at
    assert started.returncode == 1 and "Crashed" in err, (out, err)
    assert err.strip().count("\n") == 0, err  # one line
    print(f"MEASURE slot freed {freed_s:.0f} s after the kill")
    out, err = retry.communicate(timeout=900)
    assert retry.returncode == 0, err[-3000:]
    name = out.split("experiment: ")[1].split()[0]
    assert remote_experiments(origin) == {name}  # the crashed run pushed nothing
    shown = dvc(dev, "exp", "show", "--json", env=env).stdout
    assert name in shown

    # 3. A sweep on the pool, a second worker rejoined.
    cluster["workers"].append(start_worker(cluster["tmp"] / "worker3", env, POOL))
    space = cluster["tmp"] / "space.yaml"
    space.write_text(yaml.safe_dump({"kind": "grid", "space": {"train.learning_rate": [0.001, 0.003],
                                                                "train.seed": [1]}, "pruner": "median"}))
    started_s = time.monotonic()
    done = run_in(dev, env, "sweep", str(space), "--pool", POOL, "--name", "grid")
    sweep_s = time.monotonic() - started_s
    assert done.returncode == 0, done.stderr[-3000:]
    points = {"grid-1", "grid-2"}
    assert remote_experiments(origin) == points | {name}
    for point in points:  # each ran exactly once
        runs = flow_runs(prefect_api, "sweep:grid")
        mine = [r for r in runs if r["parameters"].get("name") == point]
        assert [r["state"]["type"] for r in mine] == ["COMPLETED"], mine
    print(f"MEASURE sweep of 2 points on the pool of 2 workers: {sweep_s:.0f} s")
    # Each point's training, on a worker, reported its one epoch (epochs count from 1) to its trial in the study.
    journal = JournalStorage(JournalFileBackend(str(dev / "comparisons" / "grid.journal")))
    trials = optuna.load_study(study_name="grid", storage=journal).trials
    status = dict(pd.read_csv(dev / "comparisons" / "grid.csv")[["name", "status"]].values)
    assert {t.user_attrs["experiment"]: (list(t.intermediate_values), t.state.name) for t in trials} == {
        point: ([1], {"ok": "COMPLETE", "pruned": "PRUNED"}[status[point]]) for point in points}, (trials, status)
    # Rerun: nothing is run again.
    again = run_in(dev, env, "sweep", str(space), "--pool", POOL, "--name", "grid")
    assert again.returncode == 0 and len(flow_runs(prefect_api, "sweep:grid")) == 2, again.stderr[-2000:]
    #    TPE on the pool, two trials in flight: the third is asked, and submitted, once one has ended.
    tpe = cluster["tmp"] / "tpe.yaml"
    tpe.write_text(yaml.safe_dump({"kind": "tpe", "n": 3, "seed": 1,
                                   "space": {"train.learning_rate": {"log_uniform": [0.001, 0.003]}}}))
    done = run_in(dev, env, "sweep", str(tpe), "--pool", POOL, "--name", "tpe", "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {r["parameters"]["name"]: r for r in flow_runs(prefect_api, "sweep:tpe")}
    assert sorted(runs) == ["tpe-1", "tpe-2", "tpe-3"], runs
    assert {r["state"]["type"] for r in runs.values()} == {"COMPLETED"}, runs
    at = {name: {key: datetime.fromisoformat(run[key]) for key in ("created", "end_time")} for name, run in runs.items()}
    assert at["tpe-3"]["created"] >= min(at[n]["end_time"] for n in ("tpe-1", "tpe-2")), at
    assert set(pd.read_csv(dev / "comparisons" / "tpe.csv")["status"]) == {"ok"}

    # 4. A third clone pulls and compares; an applied experiment is up to date after `dvc pull`.
    third = cluster["tmp"] / "third"
    git(cluster["tmp"], "clone", "-q", str(origin), str(third))
    dvc(third, "exp", "pull", "--no-cache", "origin", *sorted(points), env=env)  # as the sweep pulls them
    assert not any(path.is_file() for path in (third / ".dvc" / "cache").rglob("*"))  # refs only, no model
    compared = run_in(third, env, "compare", "--all", "--json")
    assert compared.returncode == 0, compared.stderr
    assert all(p in compared.stdout for p in points)
    # A point stops at evaluate (this baseline never ran export and report, so `dvc exp apply` alone
    # fails to check them out): promoting it pulls its model, applies it and runs them here, training nothing.
    promoted = run_in(third, env, "promote", "grid-1")
    assert promoted.returncode == 0 and "ran export, report for it" in promoted.stdout, promoted.stderr[-2000:]
    point_rev = experiment_commit(third, "grid-1")
    run_info = f"{artifact_paths(third)['train'].as_posix()}/{RUN_INFO}"
    assert (third / run_info).read_text() == git(third, "show", f"{point_rev}:{run_info}")  # not trained again
    assert dvc(third, "status", env=env).stdout.strip() == "Data and pipelines are up to date."
    #    `--pull` in a fresh clone restores from the run-cache the stages whose outputs DVC caches;
    #    train's git-tracked outputs (cache: false) are not pushed with its run-cache entry, so it
    #    and the stages after it run again.
    fourth = cluster["tmp"] / "fourth"
    git(cluster["tmp"], "clone", "-q", str(origin), str(fourth))
    started_s = time.monotonic()
    rerun = dvc(fourth, "exp", "run", "--pull", "-S", "train.learning_rate=0.001", "-S", "train.seed=1", env=env)
    print(f"MEASURE grid-1 again in a fresh clone with --pull: {time.monotonic() - started_s:.0f} s")
    for stage in ("download", "prepare", "validate"):
        assert f"Stage '{stage}' is cached - skipping run" in rerun.stdout, rerun.stdout
    assert "Running stage 'train'" in rerun.stdout

    # 5. The S3 server down during a push: exit 75 and one line; back up, a rerun pushes.
    s3.stop()
    down = run_in(third, env, "run", "--push", "-S", "report.dpi=60")
    assert down.returncode == 75, down.stderr[-2000:]
    assert down.stderr.strip().splitlines()[-1].startswith("error: dvc push: a remote is unreachable ("), down.stderr
    s3.start()
    up = run_in(third, env, "run", "--push")
    assert up.returncode == 0, up.stderr[-2000:]
    assert dvc(third, "status", "--cloud", env=env).stdout.strip().lower().startswith(("cache and remote", "data and pipelines"))


def test_gpu_stages_run_on_the_gpu_pool_and_come_back(cluster):
    """`--gpu-pool`: train and evaluate run on the GPU pool's worker (a clone of origin that shares
    only the remotes), the other stages here; the results land in this workspace as if run here."""
    dev, origin, env = cluster["dev"], cluster["origin"], cluster["env"]
    create_pool("gpu", env)
    home = cluster["tmp"] / "gpu-worker"
    cluster["workers"].append(start_worker(home, {**env, "CUDA_VISIBLE_DEVICES": "0"}, pool="gpu"))

    (dev / "stages" / "train.py").write_text((dev / "stages" / "train.py").read_text() + "\n# not committed\n")
    refused = run_in(dev, env, "run", "--gpu-pool", "gpu")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert refused.stderr.strip().splitlines()[-1] == (
        "error: uncommitted changes to stages/train.py would not reach the GPU pool's workers (they clone origin); "
        "commit and push them"), refused.stderr
    git(dev, "checkout", "--", "stages/train.py")

    started_s = time.monotonic()
    done = run_in(dev, env, "run", "--gpu-pool", "gpu", "-S", "train.learning_rate=0.002")
    print(f"MEASURE run with train and evaluate on the GPU pool: {time.monotonic() - started_s:.0f} s")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for stage in ("train", "evaluate"):  # with the seconds its task ran there, from Prefect's record
        (line,) = [line for line in lines if line.startswith(f"{stage}: ran")]
        assert line.endswith(" s on work pool 'gpu'") and int(line.split()[2]) > 0, lines
    for stage in ("download", "prepare", "validate", "export", "report"):
        assert any(line.startswith(f"{stage}: ran") and "work pool" not in line for line in lines), lines
    worker_log = (home / "worker.log").read_text()
    assert "Running stage 'train'" in worker_log and "Running stage 'evaluate'" in worker_log, worker_log[-3000:]
    assert "Running stage 'prepare'" not in worker_log
    # The workspace holds the whole run (model, metrics, report), consistent; no hand-off is left.
    assert dvc(dev, "status", env=env).stdout.strip() == "Data and pipelines are up to date."
    metrics = yaml.safe_load((dev / "results" / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert remote_experiments(origin) == set()
    assert "train-evaluate" not in dvc(dev, "exp", "list", "--name-only", env=env).stdout

    # The same from a run on the CPU pool: its worker sends the GPU stages on, then pushes the whole.
    done = run_in(dev, env, "run", "--pool", POOL, "--gpu-pool", "gpu", "-S", "train.learning_rate=0.003")
    assert done.returncode == 0, done.stderr[-3000:]
    name = done.stdout.split("experiment: ")[1].split()[0]
    assert remote_experiments(origin) == {name}
    assert (home / "worker.log").read_text().count("Running stage 'train'") == 2
    cpu_logs = "".join((cluster["tmp"] / f"worker{i}" / "worker.log").read_text() for i in (1, 2))
    assert "Running stage 'prepare'" in cpu_logs and "Running stage 'train'" not in cpu_logs


def test_gpu_work_pool_templates_pass_prefects_own_checks(prefect_api, prefect_env):
    """No cluster or Docker daemon runs here: the Kubernetes base job template is checked by a real
    Prefect server (placeholders against variables), the Docker deployment for its GPU request."""
    templates = REPO / "pipelines" / "work_pools"
    created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "k8s-gpu", "--type", "kubernetes",
                              "--overwrite", "--base-job-template", str(templates / "kubernetes-gpu.json")],
                             env=prefect_env, capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    pool = api(prefect_api, "GET", "/work_pools/k8s-gpu")
    container = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpus }}"
    assert pool["base_job_template"]["variables"]["properties"]["gpus"]["default"] == 1

    docker = yaml.safe_load((templates / "docker-gpu.yaml").read_text())
    entrypoints = {d["entrypoint"] for d in docker["deployments"]}
    assert entrypoints == {"pipelines/worker_flows.py:experiment_on_pool", "pipelines/worker_flows.py:stages_on_pool"}
    for deployment in docker["deployments"]:
        module, name = deployment["entrypoint"].split(":")
        assert f"def {name}(" in (REPO / module).read_text()
        assert deployment["name"] == deployment["work_pool"]["name"]  # the flow finds cifar10-stages/<pool>
        request = deployment["work_pool"]["job_variables"]["container_create_kwargs"]["device_requests"][0]
        assert request["capabilities"] == [["gpu"]] and request["count"] == -1

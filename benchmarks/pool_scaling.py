"""A sweep on a Prefect process pool with one worker and with two: wall time, per-point overhead,
what travels through the remotes.

Stands up what the scale-out test does (tests/pipelines/test_cluster.py): a Prefect server, moto's
S3 server as the DVC remote, a bare git origin, a generated dataset served over HTTP. For each
mode it starts the workers, each in its own empty folder (pinned: `taskset -c i` and one
TensorFlow thread, standing in for a one-core machine each), times `cifar10-pipeline sweep
--pool`, and reads each point's clone/pipeline/push seconds from the workers' logs and the CPU the
workers and everything else used meanwhile. One warm-up run first computes the data stages once,
so every mode restores them from the run-cache alike; a control measures what two pinned,
compute-bound processes get done beside one, the most a second pinned worker could add here. A
mode named again runs again (its turn counted in its name): in turns, e.g. `--modes pinned1 pinned2
pinned2 pinned1`, a host that slows down or speeds up part-way weighs on both modes alike; the
control is taken before each turn and once after the last.

    python benchmarks/pool_scaling.py [--modes pinned1 pinned2 unpinned1 unpinned2] [--points 4]
    python benchmarks/pool_scaling.py --source ../shared/data/cifar10-jpeg.tar.gz --sha256 HASH \
        --train-per-class 300 --test-per-class 100 --epochs 9 --points 16 --modes pinned1 pinned2

The points are a seeded random search, so every mode runs the same points: on generated data, over
learning rate and seed; on a slice of a class-folder archive (`--source`, the CIFAR-10 mirror),
the pruning benchmark's search (benchmarks/sweep_setup.py's project and space, seed 0): with its
epochs and batch size, the same 16 points it runs with and without a pruner.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import http.server
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the test suite's cluster set-up is reused; tests/ is not installed

from benchmarks.sweep_setup import SPACE, mirror_params
from tests import synthetic
from tests.helpers import (
    BIN,
    BUCKET,
    CREDENTIALS,
    create_pool,
    kill_tree,
    prefect_server,
    s3_client,
    s3_remote,
    sha256_of,
    start_worker,
)
from tests.pipelines.test_cluster import git, shared_project

TIMINGS = re.compile(r"timings: clone_s ([\d.]+), pipeline_s ([\d.]+), push_s ([\d.]+)")
ONE_THREAD = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "OMP_NUM_THREADS": "1"}


def http_root(root: Path) -> str:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def cli(cwd: Path, env: dict, *args: str, may_fail: bool = False) -> tuple[float, str]:
    """Seconds taken and the last error line ("" when it succeeded); a sweep's failed point is a
    result (`may_fail`), anything else ends the benchmark."""
    started = time.perf_counter()
    completed = subprocess.run([str(BIN / "cifar10-pipeline"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    error = completed.stderr.strip().splitlines()[-1] if completed.returncode != 0 and completed.stderr.strip() else ""
    if completed.returncode != 0 and not may_fail:
        raise SystemExit(f"cifar10-pipeline {' '.join(args)} failed: {completed.stderr[-2000:]}")
    return time.perf_counter() - started, error


def turn_label(mode: str, turn: int) -> str:
    """What names a turn's pool, its workers' folders and its sweep."""
    return f"{mode}-t{turn}"


def run_mode(mode: str, turn: int, work: Path, dev: Path, env: dict, space: Path) -> dict:
    workers_n = int(mode[-1])
    pinned = mode.startswith("pinned")
    label = turn_label(mode, turn)
    pool = f"bench-{label}"
    create_pool(pool, env)
    workers = [start_worker(work / f"{label}-worker{i}", {**env, **(ONE_THREAD if pinned else {})}, pool,
                            ("taskset", "-c", str(i)) if pinned else ()) for i in range(workers_n)]
    busy_before, idle_before = machine_cpu_s()
    parts_before = rest_cpu_s()
    try:
        seconds, error = cli(dev, env, "sweep", str(space), "--pool", pool, "--name", f"sw-{label}", may_fail=True)
        busy, idle = (after - before for after, before in zip(machine_cpu_s(), (busy_before, idle_before)))
        parts = {part: round(after - parts_before[part], 1) for part, after in rest_cpu_s().items()}
        workers_cpu = sum(tree_cpu_s(proc.pid) for proc in workers)
    finally:
        for proc in workers:
            kill_tree(proc)
    ranked = list(csv.DictReader((dev / "comparisons" / f"sw-{label}.csv").open()))
    finished = [row for row in ranked if row["status"] == "ok"]
    points = [tuple(map(float, m)) for i in range(workers_n)
              for m in TIMINGS.findall((work / f"{label}-worker{i}" / "worker.log").read_text())]
    return {"mode": mode, "turn": turn, "workers": workers_n, "pinned": pinned, "sweep_s": round(seconds, 1), "error": error,
            "points": len(points), "finished": len(finished),
            "best": {key: finished[0][key] for key in ("name", "accuracy")} if finished else None,
            "clone_s": round(statistics.mean(p[0] for p in points), 1),
            "pipeline_s": round(statistics.mean(p[1] for p in points), 1),
            "push_s": round(statistics.mean(p[2] for p in points), 1),
            # Core-seconds while the sweep ran: the workers' (their flow runs and stages included),
            # everything else's (server, S3, the sweep itself), and what no process used.
            "cpu_s": {"workers": round(workers_cpu, 1), "rest": round(busy - workers_cpu, 1), "idle": round(idle, 1),
                      "rest_parts": parts}}


def machine_cpu_s() -> tuple[float, float]:
    """The machine's busy and idle CPU-seconds since boot, all cores together (/proc/stat)."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle and iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK"), idle / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float:
    """CPU-seconds of a process and of every child it waited for, theirs included (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def rest_cpu_s() -> dict[str, float]:
    """CPU-seconds so far of what runs beside the workers: the Prefect server (its process tree),
    the sweeps this process ran and waited for, and this process itself (moto's S3 server and the
    data's HTTP server are threads of it)."""
    this = psutil.Process()
    servers = [child for child in this.children() if "server" in child.cmdline()]
    own, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"prefect_server": sum(live_tree_cpu_s(server) for server in servers),
            "sweep": waited.ru_utime + waited.ru_stime, "s3_and_http": own.ru_utime + own.ru_stime}


def live_tree_cpu_s(proc: psutil.Process) -> float:
    """CPU-seconds of a running process and all its descendants, those they waited for included."""
    total = 0.0
    for member in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = member.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
    return total


MATMULS = ("import time, numpy as np; a = np.ones((1024, 1024), np.float32); t = time.perf_counter()\n"
           "for _ in range(150): a @ a\nprint(time.perf_counter() - t)")


def pinned_compute_ceiling() -> float:
    """How much two single-threaded, compute-bound processes pinned to cores 0 and 1 get done
    beside one alone: the most a second pinned worker could add on this machine."""
    def run_on(cores: list[int]) -> float:
        procs = [subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", MATMULS], stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
                 for core in cores]
        return max(float(proc.communicate()[0]) for proc in procs)
    # The host's neighbours move a single look by tenths: the middle of three.
    return round(statistics.median(2 * run_on([0]) / run_on([0, 1]) for _ in range(3)), 2)


def bucket_size(s3_url: str) -> tuple[int, float]:
    client = s3_client(s3_url)
    objects = [o for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
               for o in page.get("Contents", [])]
    return len(objects), sum(o["Size"] for o in objects) / 1e6


def pull_into_fresh_clone(work: Path, origin: Path, env: dict, names: list[str]) -> dict:
    clone = work / "puller"
    git(work, "clone", "-q", str(origin), str(clone))
    started = time.perf_counter()
    completed = subprocess.run([str(BIN / "dvc"), "exp", "pull", "origin", *names], cwd=clone, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    cache = clone / ".dvc" / "cache"
    files = [p for p in cache.rglob("*") if p.is_file()]
    return {"experiments": len(names), "seconds": round(seconds, 1), "ok": completed.returncode == 0,
            "cache_files": len(files), "cache_mb": round(sum(p.stat().st_size for p in files) / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["pinned1", "pinned2", "unpinned1", "unpinned2"])
    parser.add_argument("--points", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=100, help="generated training images per class")
    parser.add_argument("--source", type=Path, help="a class-folder archive to take a slice of, instead")
    parser.add_argument("--sha256", help="of --source")
    parser.add_argument("--train-per-class", type=int, default=300, help="of --source")
    parser.add_argument("--test-per-class", type=int, default=100, help="of --source")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256, help="on --source")
    parser.add_argument("--out", type=Path, default=Path("pool_scaling.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pool-bench-"))
    (work / "prefect").mkdir()
    s3 = s3_remote()
    with contextlib.ExitStack() as stack:
        stack.callback(s3.stop)
        api_url = stack.enter_context(prefect_server(work / "prefect"))
        www = work / "www"
        www.mkdir()
        if args.source:
            archive = www / "data.tar.gz"
            archive.symlink_to(args.source.resolve())
            params = mirror_params(args)  # the pruning benchmark's project, its archive served over HTTP
            search = {"seed": 0, "space": SPACE}
        else:
            archive = synthetic.write_tar_gz(www / "data.tar.gz",
                                             synthetic.class_folder_files(args.per_class, args.per_class // 5))
            params = {"download": {"md5": None, "sha256": sha256_of(archive)},
                      "validate": {"expected_per_class": {"train": args.per_class, "test": args.per_class // 5}},
                      "train": {"epochs": args.epochs, "batch_size": 64},
                      "report": {"misclassified": 4, "samples_per_class": 2}}
            search = {"seed": 0, "space": {"train.learning_rate": {"log_uniform": [0.05, 0.4]},
                                           "train.seed": {"choice": [1, 2]}}}
        origin, dev = shared_project(work, f"{http_root(www)}/data.tar.gz", params, s3.url)
        env = {**os.environ, **CREDENTIALS, "PREFECT_API_URL": api_url, "PREFECT_HOME": str(work / "client"),
               "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_WORKER_QUERY_SECONDS": "2",
               "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
        space = work / "space.yaml"
        space.write_text(yaml.safe_dump({"kind": "random", "n": args.points, **search}))
        create_pool("bench-warmup", env)
        warm = start_worker(work / "warmup-worker", env, "bench-warmup")
        warmup_s, _ = cli(dev, env, "run", "--pool", "bench-warmup", "-S", "train.seed=0")
        kill_tree(warm)
        data = ({"source": args.source.name, "train_per_class": args.train_per_class,
                 "test_per_class": args.test_per_class} if args.source else {"per_class": args.per_class})
        results = {"cpu": cpu_model(), **data, "epochs": args.epochs, "space": search,
                   "warmup_run_s": round(warmup_s, 1), "modes": []}
        for i, mode in enumerate(args.modes):  # written after each: a long run interrupted keeps what it measured
            ceiling = pinned_compute_ceiling()
            results["modes"].append({**run_mode(mode, args.modes[:i + 1].count(mode), work, dev, env, space),
                                     "pinned_compute_ceiling_before": ceiling})
            write(args.out, results)
        results["pinned_compute_ceiling_after"] = pinned_compute_ceiling()
        results["sweep_s_by_mode"] = {mode: round(statistics.mean(m["sweep_s"] for m in results["modes"]
                                                                  if m["mode"] == mode), 1)
                                      for mode in dict.fromkeys(args.modes)}
        objects, megabytes = bucket_size(s3.url)
        results["s3_after_all"] = {"objects": objects, "mb": round(megabytes, 2)}
        names = [f"sw-{turn_label(args.modes[0], 1)}-{i}" for i in range(1, args.points + 1)]
        results["pull_one_sweep"] = pull_into_fresh_clone(work, origin, env, names)
    write(args.out, results)
    print(json.dumps(results, indent=2))


def write(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            flags = Path("/proc/cpuinfo").read_text()
            isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
            return f"{line.split(':', 1)[1].strip()} ({isa}, {os.cpu_count()} cores)"
    return "unknown"


if __name__ == "__main__":
    main()

"""Helpers the tests share (fixtures live in the conftest.py files): the project's paths, generated
params, fresh git + DVC repos, and the real CLIs (dvc, cifar10-pipeline, a stage) as subprocesses."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import yaml

from pipelines.prefect_server import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's own dvc, prefect and cifar10-pipeline
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
STAGES = frozenset(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])  # every stage of the DAG


TINY_TRAIN, TINY_TEST = 20, 5


def set_params(path: Path, **sections: dict) -> None:
    """Update keys of params.yaml sections, e.g. set_params(p, train={"epochs": 1})."""
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# Training that diverges: at batch 8, a learning rate of 10 sends plain SGD's loss to nan in the
# first epoch (the tests of exit 5 and of what a failed train stage leaves behind).
DIVERGES = {"model": "tutorial_cnn", "arch": {}, "epochs": 3, "optimizer": "sgd", "learning_rate": 10.0,
            "batch_size": 8, "schedule": "constant"}


def tiny_params(archive: Path) -> dict[str, dict]:
    """Params for a generated dataset of TINY_TRAIN/TINY_TEST images per class, 1 epoch."""
    return {
        # A local source is pinned by its checksum (DVC cannot watch a file outside the repo).
        "download": {"source": str(archive), "md5": None, "sha256": sha256_of(archive)},
        "validate": {"expected_per_class": {"train": TINY_TRAIN, "test": TINY_TEST}},
        "train": {"epochs": 1, "batch_size": 32},
        "report": {"misclassified": 4, "samples_per_class": 2},
    }


def stage_command(verb: str) -> list[str]:
    """The stage's command as dvc.yaml writes it, with its `${paths.*}` filled in as DVC does."""
    from stages.common.paths import artifact_paths

    cmd = " ".join(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][verb]["cmd"].split())
    paths = artifact_paths(REPO)
    return re.sub(r"\$\{paths\.(\w+)\}", lambda m: str(paths[m.group(1)]), cmd).split()


def run_benchmark(name: str, *args: str, backend: str = "tensorflow", cwd: Path | None = None
                  ) -> subprocess.CompletedProcess:
    """A script in benchmarks/, run as a user runs it, on the given Keras backend."""
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / name), *args],
                          env={**os.environ, "KERAS_BACKEND": backend}, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def run_stage(verb: str, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The stage as DVC runs it (dvc.yaml's command, with python from this environment)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    _, *rest = stage_command(verb)
    return subprocess.run([sys.executable, *rest, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def git_dvc_project(dest: Path) -> Path:
    """A fresh git + DVC repo holding this project's pipeline files (what a user clones)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("stages", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, dest / name)
    (dest / ".dvc").mkdir()
    shutil.copy(REPO / ".dvc" / "config", dest / ".dvc" / "config")
    shutil.copy(REPO / ".dvc" / ".gitignore", dest / ".dvc" / ".gitignore")
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "pipeline"], cwd=dest, check=True)
    return dest


def copy_repo(src: Path, dest: Path) -> Path:
    """A copy of a built git + DVC repo, so a test can change it without touching the next test's
    starting point (DVC's temporary state stays behind: it is tied to the original's path)."""
    shutil.copytree(src, dest, symlinks=True, ignore=lambda folder, names: ["tmp"] if folder.endswith(".dvc") else [])
    return dest


def commit_experiment(repo: Path, name: str, files: dict[str, str], baseline: str = "HEAD") -> str:
    """A commit on `baseline` holding `files` (repo-relative path: text), under the ref DVC gives an
    experiment named `name` (refs/exps/<baseline sha split 2/38>/<name>); the checkout is left as it was."""
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.invalid"]
    base = subprocess.run(["git", "rev-parse", baseline], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(tmp) / "index")}  # the checkout's own index untouched
        subprocess.run(["git", "read-tree", base], cwd=repo, env=env, check=True)
        for path, text in files.items():
            blob = subprocess.run(["git", "hash-object", "-w", "--stdin"], cwd=repo, input=text, check=True,
                                  capture_output=True, text=True).stdout.strip()
            subprocess.run(["git", "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}"], cwd=repo, env=env,
                           check=True)
        tree = subprocess.run(["git", "write-tree"], cwd=repo, env=env, check=True, capture_output=True,
                              text=True).stdout.strip()
    sha = subprocess.run([*git, "commit-tree", tree, "-p", base, "-m", f"experiment {name}"], cwd=repo, check=True,
                         capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "update-ref", f"refs/exps/{base[:2]}/{base[2:]}/{name}", sha], cwd=repo, check=True)
    return sha


def dvc(repo: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=env or ENV, capture_output=True, text=True,
                            timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '(\w+)'", output))


def cli(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cifar10-pipeline"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def cli_on_terminal(env: dict, *args: str, timeout: float = 600) -> tuple[int, str]:
    """`cifar10-pipeline ARGS` with its stdout and stderr on an 80-column pseudo-terminal, as a user
    at a terminal runs it: its exit code and everything the terminal received, control codes and all."""
    import fcntl
    import pty
    import struct
    import termios

    main_fd, terminal_fd = pty.openpty()
    fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80 columns, 24 rows
    env = {key: value for key, value in env.items() if key not in ("COLUMNS", "LINES")}  # the terminal's size rules
    proc = subprocess.Popen([str(BIN / "cifar10-pipeline"), *args], env={**env, "TERM": "xterm"}, stdin=subprocess.DEVNULL,
                            stdout=terminal_fd, stderr=terminal_fd, start_new_session=True)
    os.close(terminal_fd)
    received = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # read as it comes: a full terminal would block the command
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:  # EIO: the command and all it started closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(main_fd)
    try:
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), received.decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def api(url: str, method: str, path: str, json: dict | None = None, attempts: int = 5):
    """A Prefect REST call, retried on 429/502/503 as Prefect's own client retries them (a
    create_flow_run call got a 503 from the test server in one CI run on a busy 2-core machine)."""
    for attempt in range(attempts):
        response = httpx.request(method, f"{url}{path}", json=json, timeout=30)
        if response.status_code not in (429, 502, 503) or attempt == attempts - 1:
            break
        time.sleep(2**attempt)
    response.raise_for_status()
    return response.json() if response.content else None


def serving(health_url: str, proc: subprocess.Popen, timeout_s: float, interval_s: float = 0.5) -> bool:
    """Wait until `health_url` answers 200 (True), or `proc` exits or `timeout_s` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


@contextlib.contextmanager
def prefect_server(home: Path, database_url: str | None = None) -> Iterator[str]:
    """A real Prefect server on 127.0.0.1 with its PREFECT_HOME in `home` (SQLite there, or the
    database at `database_url`); yields its API URL and stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "true", "PREFECT_API_URL": url,
           **({"PREFECT_API_DATABASE_CONNECTION_URL": database_url} if database_url else {})}
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            if not serving(f"{url}/health", proc, timeout_s=120, interval_s=1):
                raise RuntimeError(f"Prefect server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
            yield url
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


@contextlib.contextmanager
def inference_api(*args: str, env: dict | None = None, startup_s: float = 90) -> Iterator[tuple[str, int]]:
    """`cifar10-pipeline api ARGS` on a free port of 127.0.0.1, once it answers /health; yields
    (base URL, pid) and stops it after. Its log goes to a file: a pipe nobody reads fills up under
    a loop of requests (one access-log line each), and the server then blocks writing to it."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as output:
        proc = subprocess.Popen([str(BIN / "cifar10-pipeline"), "api", *args, "--port", str(port)], env=env or ENV,
                                stdout=output, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            if not serving(f"{url}/health", proc, startup_s):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                output.seek(0)
                raise RuntimeError(f"the API did not start:\n{output.read()[-3000:]}")
            yield url, proc.pid
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)


# Debian's Chromium, headless, with its own background traffic off.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--hide-scrollbars"]
LOCAL_URL = re.compile(r"^(file://|data:|blob:|about:|https?://(127\.0\.0\.1|localhost)[:/])")
# Drawn charts: Vega's canvas or SVG marks, and any other canvas or SVG with content.
CHARTS_JS = ("[...document.querySelectorAll('canvas, svg')].filter(e => e.getBoundingClientRect().width > 50"
             " && e.getBoundingClientRect().height > 50).length")


def chromium() -> str:
    """Debian's chromium, or a failed test that says how to get it (never a silent skip)."""
    import pytest

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("Chromium not found: install Debian's chromium package (apt-get install chromium); .ci/run does")
    return found


@dataclasses.dataclass
class PageVisit:
    requested: list[str]  # every URL the page asked for, itself included
    failed: list[str]  # requests that got no response
    charts: int  # canvas/svg elements larger than 50x50 px after the page's scripts ran
    images: tuple[int, int]  # (<img> elements decoded, <img> elements)
    text: str  # the rendered page's text
    screenshot: Path
    values: list = dataclasses.field(default_factory=list)  # what each of `script`'s expressions gave

    def external(self) -> list[str]:
        return [url for url in self.requested if not LOCAL_URL.match(url)]


def visit(url: str, workdir: Path, settle_s: float = 3.0, wait_for_text: str | None = None, timeout_s: float = 60,
          upload: tuple[str, list[Path], str] | None = None, script: list[str] = (),
          window: tuple[int, int] = (1280, 1600)) -> PageVisit:
    """Open `url` in headless Chromium (a `window` of width and height) through the DevTools
    protocol: record every request the page makes, let its scripts run (until `wait_for_text`
    shows, when given), then, with `upload`
    (a file input's selector, files, text to wait for), pick those files in that input; count
    drawn charts, evaluate each of `script`'s JavaScript expressions in turn (what a user's clicks
    and typing do) and take a screenshot."""
    import base64
    import json

    from websockets.sync.client import connect

    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "profile" / "DevToolsActivePort"
    port_file.unlink(missing_ok=True)  # a reused workdir must not hand over an earlier browser's port
    browser = subprocess.Popen([chromium(), *CHROMIUM_FLAGS, f"--window-size={window[0]},{window[1]}",
                                f"--user-data-dir={workdir / 'profile'}",
                                "--remote-debugging-port=0", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while not port_file.is_file() or len(port_file.read_text().split()) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        target = next(t for t in httpx.get(f"http://127.0.0.1:{port}/json/list").json() if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            ids = iter(range(1, 1_000_000))
            requested, failed = [], []

            def call(method: str, **params):
                sent = next(ids)
                ws.send(json.dumps({"id": sent, "method": method, "params": params}))
                while True:
                    message = json.loads(ws.recv(timeout=timeout_s))
                    if message.get("id") == sent:
                        return message.get("result", {})
                    if message.get("method") == "Network.requestWillBeSent":
                        requested.append(message["params"]["request"]["url"])
                    elif message.get("method") == "Network.loadingFailed":
                        failed.append(message["params"].get("errorText", ""))

            def page_text() -> str:
                return call("Runtime.evaluate", expression="document.body ? document.body.innerText : ''",
                            returnByValue=True)["result"].get("value", "")

            call("Network.enable")
            call("Page.enable")
            call("Page.navigate", url=url)
            deadline = time.monotonic() + timeout_s
            while wait_for_text and wait_for_text not in page_text() and time.monotonic() < deadline:
                time.sleep(0.5)
            if upload is not None:
                selector, files, wait_for_text = upload
                root = call("DOM.getDocument")["root"]["nodeId"]
                node = call("DOM.querySelector", nodeId=root, selector=selector)["nodeId"]
                call("DOM.setFileInputFiles", nodeId=node, files=[str(f) for f in files])
                while wait_for_text not in page_text() and time.monotonic() < deadline:
                    time.sleep(0.5)
            time.sleep(settle_s)
            charts = call("Runtime.evaluate", expression=CHARTS_JS, returnByValue=True)["result"]["value"]
            images = call("Runtime.evaluate", returnByValue=True, expression=(
                "[[...document.images].filter(i => i.complete && i.naturalWidth > 0).length, document.images.length]"
            ))["result"]["value"]
            values = [call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")
                      for expression in script]
            text = page_text()
            shot = workdir / "page.png"
            shot.write_bytes(base64.b64decode(call("Page.captureScreenshot", format="png")["data"]))
        return PageVisit(requested, failed, charts, tuple(images), text, shot, values)
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait(timeout=30)


def not_blank(png: Path) -> bool:
    """More than a background: a drawn page has many distinct colours."""
    from PIL import Image

    with Image.open(png) as image:
        return len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20


# A fast stand-in for train and evaluate, for tests about what is done with runs (compare, history,
# the gate): it writes their result files (metrics, report, confusion matrix, predictions,
# per-epoch curves) at the paths the project's dvc.yaml names, from the project's params.yaml, in
# about a second.
SCORER = '''
"""Writes what train and evaluate would, from params.yaml: more epochs, better scores."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import classification_report, confusion_matrix, f1_score

params = yaml.safe_load(Path("params.yaml").read_text())
train = params["train"]
evaluate, curves = Path(sys.argv[1]), Path(sys.argv[2]) / "plots" / "metrics"
classes = np.array(["cat", "dog", "frog", "ship"])
accuracy = min(0.95, 0.3 + 0.08 * train["epochs"] - 0.1 * abs(np.log10(train["learning_rate"] / 1.5)))
n = 400
actual = np.arange(n) % 4
right = np.random.default_rng(train["epochs"]).permutation(n) < round(accuracy * n)
predicted = np.where(right, actual, (actual + 1 + np.arange(n) // 4 % 3) % 4)
evaluate.mkdir(parents=True, exist_ok=True)
pd.DataFrame({"index": range(n), "actual": classes[actual], "predicted": classes[predicted],
              "probability": 0.5}).to_csv(evaluate / "predictions.csv", index=False)
report = classification_report(classes[actual], classes[predicted], output_dict=True, zero_division=0)
(evaluate / "classification_report.json").write_text(json.dumps(report))
(evaluate / "classification_report.txt").write_text("")
pd.DataFrame(confusion_matrix(actual, predicted), index=classes, columns=classes).to_csv(
    evaluate / "confusion_matrix.csv")
(evaluate / "metrics.json").write_text(json.dumps({
    "loss": round(2 - accuracy * 1.5, 4), "accuracy": round(float((actual == predicted).mean()), 4),
    "f1_macro": round(float(f1_score(actual, predicted, average="macro")), 4), "images": n,
    "split": params["evaluate"]["split"],
    "data": "0123456789abcdef"}))
for split, offset in (("train", 0.05), ("eval", 0.0)):
    for metric in ("accuracy", "loss"):
        steps = np.arange(train["epochs"])
        values = accuracy * (steps + 1) / train["epochs"] + offset
        (curves / split).mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"step": steps, metric: values if metric == "accuracy" else 2 - values}).to_csv(
            curves / split / f"{metric}.tsv", sep="\\t", index=False)
'''

def scored_project(root):
    """A git + DVC repo with the project's params.yaml and dvc.yaml's paths, plots and model artifact,
    and one stage, `evaluate`, that runs SCORER."""
    root.mkdir(parents=True)
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())
    paths = declared["vars"][0]["paths"]
    declared["stages"] = {"evaluate": {
        "cmd": "python scorer.py ${paths.evaluate} ${paths.train}", "deps": ["scorer.py"],
        "params": ["train", "evaluate.split"],
        "outs": [{f"${{paths.evaluate}}/{name}": {"cache": False}} for name in
                 ("classification_report.json", "classification_report.txt", "confusion_matrix.csv",
                  "predictions.csv")] + [{"${paths.train}/plots": {"cache": False}}],
        "metrics": [{"${paths.evaluate}/metrics.json": {"cache": False}}]}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(declared, sort_keys=False))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "scorer.py").write_text(SCORER)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True)
    for key, value in (("user.name", "t"), ("user.email", "t@example.invalid")):  # GTO tags as the user
        subprocess.run(["git", "config", key, value], cwd=root, check=True)
    dvc(root, "init", "-q")
    assert paths["evaluate"] == "results/evaluate"
    return root


def commit(repo, message: str, minutes: int, run: bool = True, **train) -> str:
    """A commit dated `minutes` from now (runs made in one second would tie in git's order)."""
    if train:
        set_params(repo / "params.yaml", train=train)
    if run:
        dvc(repo, "repro", "-q")
    date = f"@{int(time.time() + 60 * minutes)} +0000"
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=repo, check=True,
                   env={**ENV, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


# Team infrastructure on one machine: an S3 server for the DVC remote, Prefect process workers.
BUCKET = "dvc-remote"


class MotoS3:
    """moto's S3 server on 127.0.0.1 (as dvc-s3's own tests start it); stop and start keep the data."""

    def __init__(self) -> None:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per S3 request otherwise
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()


CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
                        region_name=CREDENTIALS["AWS_DEFAULT_REGION"])


def s3_remote() -> MotoS3:
    """moto's S3 server, started, with the bucket the DVC remote uses."""
    s3 = MotoS3()
    s3.start()
    s3_client(s3.url).create_bucket(Bucket=BUCKET)
    return s3


def start_worker(home, env: dict, pool: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen:
    """A process worker in its own empty folder (its flow runs' temporary clones go there too);
    `prefix` wraps the command (taskset)."""
    home.mkdir(exist_ok=True)  # a worker restarted on the same machine keeps its folder
    log = open(home / "worker.log", "w")  # noqa: SIM115 - the worker writes to it until it stops
    return subprocess.Popen([*prefix, str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
                             "--limit", "1"], cwd=home,
                            env={**env, "PREFECT_HOME": str(home / ".prefect"), "TMPDIR": str(home)},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def running_under(proc: subprocess.Popen, text: str) -> bool:
    """Whether a process under `proc` has `text` in its command line; a child that ends while it is
    looked at (git, dvc) is passed over, not an error."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return False
    for child in children:
        try:
            if text in " ".join(child.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """`sig` to the worker and everything under it, its flow run and stages: SIGKILL, a machine
    dying; SIGTERM, a machine shutting down or a container stopped."""
    parent = psutil.Process(proc.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)


def create_pool(name: str, env: dict) -> None:
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", name, "--type", "process", "--overwrite"], env=env,
                   check=True, capture_output=True)


@contextlib.contextmanager
def webhook_receiver() -> Iterator[tuple[str, list[dict]]]:
    """An HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it."""
    received: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", received
    finally:
        server.shutdown()

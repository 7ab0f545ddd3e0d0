"""The Prefect API servers this project starts: the one `cifar10-pipeline server` keeps up, and the
temporary one a `run` without PREFECT_API_URL uses (Prefect's own temporary server outlives a
`kill -9` of the command that started it, holding its port and database).

Each ends with the command that started it, however that command ends: Ctrl-C and SIGTERM stop it
in order, and the kernel stops it when the command dies without a chance to (PR_SET_PDEATHSIG).
`flow_api` is how a command picks the API its flow reports to: PREFECT_API_URL's, or a temporary one.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from stages.common.errors import TRACEBACK_ENV, ConfigError, PipelineError, TransientError

PR_SET_PDEATHSIG = 1  # linux/prctl.h
STOP_GRACE_S = 10.0

# Prefect's analytics and telemetry reach for hosts this machine may not reach (its errors then
# fill the log) and report on the user's runs: off for every server the project starts.
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}


def _prctl() -> ctypes._CFuncPtr | None:
    """libc's prctl, looked up before any fork (a lookup in the child could take the loader's locks)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: Ctrl-C and SIGTERM still stop the servers
        return None


PRCTL = _prctl()


def die_with_parent() -> None:
    """In a child between fork and exec: the kernel sends it SIGTERM when its parent dies."""
    if PRCTL is not None:
        PRCTL(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A server in its own process group (so stopping it stops its children too) that dies with us.
    Must be called from the main thread: the kernel's signal follows the thread that started it."""
    # preexec_fn runs one libc call, resolved beforehand: nothing that could wait on another thread's lock.
    return subprocess.Popen(command, env=env, start_new_session=True, preexec_fn=die_with_parent)  # noqa: PLW1509


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's group, SIGKILL after a grace: nothing of it keeps the port."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def serve(port: int, home: Path) -> int:
    """`prefect server start` on 127.0.0.1:port with its database in `home`, until it ends or we are
    stopped; its UI talks to this port's API."""
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(home), "PREFECT_UI_API_URL": url, "PREFECT_API_URL": url}
    prefect = Path(sys.executable).parent / "prefect"
    proc = start([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
    try:
        return proc.wait()
    finally:
        stop(proc)


@contextlib.contextmanager
def temporary_api(home: Path, startup_timeout_s: float) -> Iterator[str]:
    """Prefect's API (no UI) on a free port of 127.0.0.1 for the block, as Prefect's own temporary
    server runs it, with its SQLite database in `home`; yields the API URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    spec = importlib.util.find_spec("prefect")  # where it is installed, without importing it yet
    assert spec is not None and spec.origin is not None
    env = {**os.environ, **QUIET, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "0",
           "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = start([sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parents[1]), "--factory",
                  "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
                  "--log-level", "error", "--lifespan", "on"], env)
    try:
        wait_until_healthy(url, proc, startup_timeout_s)
        yield url
    finally:
        stop(proc)


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TransientError(f"Prefect's temporary API exited with {proc.returncode} while starting; rerun")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise TransientError(f"Prefect's temporary API did not answer within {timeout_s:g} s; rerun, or raise "
                         "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")


def orchestration_status(api_url: str | None, warn: Callable[[str], None],
                         flow_runs: int = 5) -> dict[str, list[dict[str, str]]]:
    """What the Prefect server at `api_url` holds of this project: every deployment with its
    schedules and pool, and the newest flow runs with their states; nothing without a server, and
    an unreachable one is named through `warn`, not fatal."""
    if not api_url:
        return {}
    if not api_reachable(api_url):
        warn(f"warning: the Prefect API at {api_url} is unreachable; showing DVC's view only")
        return {}
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    # Not the runs a schedule has lined up for the coming days: those are the deployments' schedules.
    started = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])))
    with get_client(sync_client=True) as client:
        flows = {flow.id: flow.name for flow in client.read_flows()}
        deployments = [{
            "deployment": f"{flows.get(d.flow_id, '?')}/{d.name}",
            "schedules": ", ".join(describe_schedule(s.schedule) for s in d.schedules if s.active) or "none",
            "paused": "yes" if d.paused else "no",
            "pool": d.work_pool_name or "served by a process (flow.serve)",
        } for d in client.read_deployments()]
        runs = [{
            "flow run": f"{flows.get(r.flow_id, '?')}/{r.name}",
            "state": r.state_name or "?",
            "started": r.start_time.isoformat(timespec="seconds") if r.start_time else "not yet",
        } for r in client.read_flow_runs(flow_run_filter=started, sort=FlowRunSort.START_TIME_DESC, limit=flow_runs)]
    return {"deployments": deployments, "flow_runs": runs}


def describe_schedule(schedule: object) -> str:
    for kind in ("cron", "interval", "rrule"):
        value = getattr(schedule, kind, None)
        if value is not None:
            return f"{kind} {value}"
    return str(schedule)


# The project's Prefect home (SQLite database, settings) when PREFECT_HOME is not set.
PREFECT_HOME = Path(".prefect")


def api_reachable(url: str) -> bool:
    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def require_server(api_url: str | None, why: str = "a work pool needs a Prefect server that workers reach") -> None:
    """Work pools and automations live on a Prefect server; Prefect's temporary one ends with this command."""
    if not api_url:
        raise ConfigError(f"{why}: set PREFECT_API_URL (see docs/scaling.md)")
    if not api_reachable(api_url):
        raise TransientError(f"the Prefect API at {api_url} is unreachable; start it and rerun")


@contextlib.contextmanager
def flow_api(repo: Path) -> Iterator[None]:
    """The Prefect API a command's flow reports to for the block: PREFECT_API_URL's, or else a
    temporary one of the project's (`temporary_api`) that ends with the block; and Prefect's console
    logging set to show an expected failure as its one line."""
    if os.environ.get("PREFECT_API_URL"):
        expected_failures_in_one_line()
        yield
        return
    # The temporary API keeps its runs in PREFECT_HOME's SQLite database: the project's own, which
    # `cifar10-pipeline server` serves, so the runs stay browsable there.
    home = Path(os.environ.setdefault("PREFECT_HOME", str(repo / PREFECT_HOME)))
    home.mkdir(parents=True, exist_ok=True)
    startup_s = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    with temporary_api(home, startup_s) as url:
        # Before Prefect is imported: its background workers (logs, events) read the settings it
        # loaded then, and without an API URL each would start a temporary server of its own.
        os.environ["PREFECT_API_URL"] = url
        try:
            expected_failures_in_one_line()
            yield
        finally:
            flush_prefect_logs()
            del os.environ["PREFECT_API_URL"]


def flush_prefect_logs() -> None:
    """Send the run's last logs and events while the temporary API still listens."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)


class _ExpectedFailuresInOneLine(logging.Formatter):
    """Prefect's console format, less the traceback Prefect logs with a task's or flow's failure
    when it is one of ours: its message says what failed and what to do (the final `error:` line
    repeats it), and TRACEBACK_ENV shows the traceback to whoever wants it."""

    def __init__(self, inner: logging.Formatter) -> None:
        from prefect.exceptions import TerminationSignal  # SIGTERM, as Prefect raises it in a flow

        super().__init__()
        self.inner = inner
        self.expected = (PipelineError, KeyboardInterrupt, TerminationSignal)

    def format(self, record: logging.LogRecord) -> str:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, self.expected) and not os.environ.get(TRACEBACK_ENV):
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return self.inner.format(record)


def expected_failures_in_one_line() -> None:
    import prefect.main  # noqa: F401 - sets up Prefect's logging, whose console handlers are changed here
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.root, *(logger for logger in logging.root.manager.loggerDict.values()
                                if isinstance(logger, logging.Logger))]
    for handler in {h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}:
        if handler.formatter is not None and not isinstance(handler.formatter, _ExpectedFailuresInOneLine):
            handler.setFormatter(_ExpectedFailuresInOneLine(handler.formatter))

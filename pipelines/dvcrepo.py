"""What the flow needs from DVC: the stage graph, why stages are stale, running one stage.

The DAG is read from DVC (`Repo.index.graph`), never restated here, so dvc.yaml stays the one
place it is written. Stages run through the `dvc` CLI, so DVC alone decides what is up to date.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from stages.common.errors import FLOW_PROCESS_ENV, CommandFailed, ConfigError, StageFailed, TransientError, this_process
from stages.common.params import flatten


@dataclass(frozen=True)
class StageGraph:
    order: list[str]  # topological: every stage after the stages it depends on
    upstream: dict[str, list[str]]
    gpu: frozenset[str] = frozenset()  # marked `meta: {accelerator: gpu}` in dvc.yaml

    def up_to(self, stage: str) -> StageGraph:
        """The stage and every stage it depends on, as `dvc repro STAGE` runs them."""
        if stage not in self.order:
            raise ConfigError(f"there is no stage '{stage}' in dvc.yaml; stages: {', '.join(self.order)}")
        keep, todo = {stage}, [stage]
        while todo:
            for up in self.upstream[todo.pop()]:
                if up not in keep:
                    keep.add(up)
                    todo.append(up)
        return StageGraph(order=[s for s in self.order if s in keep],
                          upstream={s: ups for s, ups in self.upstream.items() if s in keep}, gpu=self.gpu & keep)


GPU_MARK = ("accelerator", "gpu")


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    ran: bool  # the stage's outputs in the workspace changed: run, or restored from DVC's run-cache
    seconds: float
    from_run_cache: bool = False
    pool: str | None = None  # the work pool that ran it, when not this machine

    def describe(self) -> str:
        if not self.ran:
            return f"{self.stage}: up to date"
        if self.from_run_cache:
            return f"{self.stage}: restored from run-cache"
        return f"{self.stage}: ran {self.seconds:.0f} s" + (f" on work pool '{self.pool}'" if self.pool else "")


def dvc_executable() -> str:
    """The dvc next to this Python, so the flow uses the project's environment."""
    candidate = Path(sys.executable).parent / "dvc"
    return str(candidate) if candidate.exists() else "dvc"


def dvc_environment() -> dict[str, str]:
    """The environment for a dvc command: this Python's folder first on PATH. dvc runs each stage's
    `python -m stages.<verb>` with the first `python` on PATH, which must be the interpreter of the
    installed CLI whether or not the user activated its virtual environment."""
    folder = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([folder, os.environ.get("PATH", os.defpath)]),
            FLOW_PROCESS_ENV: this_process()}  # a stage stops once this process is gone


class RepoBusy(TransientError):
    pass


def inspect_repo(repo_dir: Path) -> tuple[StageGraph, dict[str, list[str]]]:
    """The stage graph and, per stale stage, why DVC considers it stale (one Repo load)."""
    from dvc.lock import LockError
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        names = {stage: stage.name for stage in graph.nodes}
        key, value = GPU_MARK
        gpu = frozenset(stage.name for stage in graph.nodes if (getattr(stage, "meta", None) or {}).get(key) == value)
        dag = nx.DiGraph()
        dag.add_nodes_from(names.values())
        dag.add_edges_from((names[up], names[down]) for down, up in graph.edges)
        try:
            status = repo.status()
        except LockError:
            raise RepoBusy(f"another dvc command is running in {repo_dir}; wait for it to finish and rerun") from None
    stage_graph = StageGraph(order=_file_order(repo_dir, dag), upstream={n: sorted(dag.predecessors(n)) for n in dag},
                             gpu=gpu)
    reasons = _reasons(repo_dir, status)
    for stage in reasons:  # DVC calls every dep of a stage it has no record of "modified"
        if lock_entry(repo_dir, stage) is None:
            reasons[stage] = ["never run here (dvc.lock has no record of it)"]
    return stage_graph, reasons


def stage_names(repo_dir: Path) -> list[str]:
    """The stages dvc.yaml writes, in its order (read as text: no DVC repo is loaded)."""
    import yaml

    return list((yaml.safe_load((repo_dir / "dvc.yaml").read_text()) or {}).get("stages", {}))


def git_tracked_outputs(repo_dir: Path, stages: list[str] | None = None) -> list[str]:
    """Outputs DVC leaves to git (`cache: false`: metrics, curves, predictions), relative paths;
    of `stages` only, when given."""
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        return sorted({str(Path(out.fs_path).relative_to(repo_dir.resolve())) for out in repo.index.outs
                       if not out.use_cache and (stages is None or out.stage.name in stages)})


def _file_order(repo_dir: Path, dag: nx.DiGraph) -> list[str]:
    """Topological order, ties broken by the order stages are written in dvc.yaml."""

    written = stage_names(repo_dir)
    rank = {name: (written.index(name) if name in written else len(written)) for name in dag}
    return list(nx.lexicographical_topological_sort(dag, key=lambda n: (rank[n], n)))


def _reasons(repo_dir: Path, status: dict) -> dict[str, list[str]]:
    """{stage: ["param train: train.epochs 1 -> 3", ...]} from `dvc status` output."""
    reasons: dict[str, list[str]] = {}
    for stage, entries in status.items():
        name = stage.split(":")[-1]
        for entry in entries:
            if isinstance(entry, str):
                reasons.setdefault(name, []).append(entry)
                continue
            for kind, changes in entry.items():
                for path, change in (changes.items() if isinstance(changes, dict) else [(kind, changes)]):
                    if isinstance(change, dict):  # params: {"train": "modified"}
                        for key, what in change.items():
                            detail = _param_diff(repo_dir, name, path, key) if what == "modified" else what
                            reasons.setdefault(name, []).append(f"param {key}: {detail}")
                    else:
                        reasons.setdefault(name, []).append(f"{kind}: {path} {change}")
    return reasons


def _param_diff(repo_dir: Path, stage: str, params_file: str, key: str) -> str:
    """'train.epochs 1 -> 3' for a whole-section param DVC only calls 'modified'."""
    import yaml

    try:
        lock = yaml.safe_load((repo_dir / "dvc.lock").read_text())
        old = lock["stages"][stage]["params"][params_file][key]
        new = yaml.safe_load((repo_dir / params_file).read_text())
        for part in key.split("."):
            new = new[part]
    except (OSError, KeyError, TypeError):
        return "modified"
    before, after = flatten(old, key), flatten(new, key)
    changes = [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]
    return ", ".join(changes) or "modified"


def _which_change(stages: list[str]) -> str:
    if len(stages) == 1:
        return f"{stages[0]} changes its outputs"
    return f"{', '.join(stages[:-1])} or {stages[-1]} change their outputs"


def plan(graph: StageGraph, reasons: dict[str, list[str]]) -> dict[str, str]:
    """Each stage's expected fate: why it will run, or that it is up to date."""
    fate: dict[str, str] = {}
    for stage in graph.order:
        if stage in reasons:
            fate[stage] = "will run: " + "; ".join(reasons[stage])
        else:
            changed_up = [u for u in graph.upstream[stage] if fate[u].startswith(("will run", "may run"))]
            fate[stage] = f"may run: if {_which_change(changed_up)}" if changed_up else "up to date"
    return fate


_ERROR_LINE = re.compile(r"^error: (.*)$", re.MULTILINE)
_DVC_ERROR = re.compile(r"^ERROR: (.*)$", re.MULTILINE)
_EXIT_CODE = re.compile(r"exited with (-?\d+)")


# Stages now running (by process group), so the flow can end them when it is itself stopped.
RUNNING: dict[int, subprocess.Popen] = {}


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGINT first (stages clean their temporary files and exit 130), SIGKILL after a grace.

    The leader is reaped as it exits (an unreaped one would keep answering `killpg(pgid, 0)`),
    and the wait ends as soon as no process of the group is left.
    """
    pgid = proc.pid
    try:
        os.killpg(pgid, signal.SIGINT)
    except ProcessLookupError:
        proc.poll()
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(pgid):
            return
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_all_stages() -> None:
    for proc in list(RUNNING.values()):
        stop_group(proc)
        RUNNING.pop(proc.pid, None)


def lock_entry(repo_dir: Path, stage: str) -> object:
    """The stage's entry in dvc.lock (None before its first run): what DVC records it produced."""
    import yaml

    try:
        return (yaml.safe_load((repo_dir / "dvc.lock").read_text()) or {}).get("stages", {}).get(stage)
    except OSError:
        return None


# Where a stage's previous outputs wait while it runs (DVC deletes them before running it).
OUTPUTS_BACKUP = Path(".dvc/tmp/cifar10-previous-outputs")


def recorded_outputs(repo_dir: Path, stage: str) -> list[str]:
    """The outputs dvc.lock records for the stage (none before its first run), repo-relative."""
    entry = lock_entry(repo_dir, stage)
    outs = entry.get("outs", []) if isinstance(entry, dict) else []
    return sorted({out["path"] for out in outs if isinstance(out, dict) and isinstance(out.get("path"), str)})


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link costs no space or time; a copy where the file system refuses one."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _save(path: Path, into: Path) -> None:
    into.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.copytree(path, into, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(path), str(into))


def _put_back(saved: Path, path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    os.replace(saved, path)


def restore_hint(stage: str, outputs: list[str]) -> str:
    return (f"restore its previous outputs with `dvc checkout {stage}` (cached ones) and "
            f"`git checkout -- {' '.join(outputs)}` (git-tracked ones, if committed)")


@contextlib.contextmanager
def previous_outputs_kept(repo_dir: Path, stage: str, log: Callable[[str], None] = print) -> Iterator[None]:
    """The stage's outputs as they were before it ran, put back if it fails or is stopped: DVC
    deletes a stage's outputs before running it, and a failed run would leave none (and the
    stages after it inconsistent with what is there). They are linked aside, not copied."""
    outputs = [out for out in recorded_outputs(repo_dir, stage) if (repo_dir / out).exists()]
    backup = repo_dir / OUTPUTS_BACKUP / stage
    shutil.rmtree(backup, ignore_errors=True)
    try:
        for out in outputs:
            _save(repo_dir / out, backup / out)
    except OSError as err:
        shutil.rmtree(backup, ignore_errors=True)
        raise TransientError(f"could not set {stage}'s previous outputs aside before running it ({err}); "
                             "free space and rerun") from None
    try:
        yield
    except BaseException as err:  # Prefect turns SIGTERM into its own TerminationSignal
        try:
            for out in outputs:
                _put_back(backup / out, repo_dir / out)
        except OSError as restore_err:
            log(f"{stage}: could not put its previous outputs back ({restore_err}); {restore_hint(stage, outputs)}")
            if isinstance(err, StageFailed):
                raise StageFailed(stage, f"{err.detail}; {restore_hint(stage, outputs)}", err.stage_exit_code) from None
            raise
        if outputs:
            log(f"{stage}: its previous outputs were put back ({', '.join(outputs)})")
            if isinstance(err, StageFailed):
                raise StageFailed(stage, f"{err.detail}; its previous outputs were put back",
                                  err.stage_exit_code) from None
        raise
    finally:
        shutil.rmtree(backup, ignore_errors=True)


# A child started with SIGINT ignored (the flow run as a background job, say) would hand that on
# to dvc and the stage, and Ctrl-C or a stop would never reach them: reset it, then exec.
_SIGINT_DEFAULT = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")


def with_default_sigint(command: list[str]) -> list[str]:
    return [sys.executable, "-c", _SIGINT_DEFAULT, *command]


def set_arg(key: str, value: object) -> str:
    """`key=value` for `dvc exp run -S`, which reads the value as YAML: JSON is valid YAML."""
    return f"{key}={json.dumps(value)}"


def run_stage(
    repo_dir: Path, stage: str, log: Callable[[str], None] = print, timeout_s: float | None = None,
    pull: bool = False,
) -> StageOutcome:
    """`dvc repro --single-item <stage>`, streaming its output to `log`; with `pull`, missing
    inputs come from the DVC remote and a run computed elsewhere is restored from its run-cache.

    The command runs in its own process group: on timeout (or when the flow is stopped, see
    `stop_all_stages`) the whole group is ended, dvc and the stage's Python process alike.
    """
    with previous_outputs_kept(repo_dir, stage, log):
        return _run_stage(repo_dir, stage, log, timeout_s, pull)


def _run_stage(repo_dir: Path, stage: str, log: Callable[[str], None], timeout_s: float | None,
               pull: bool) -> StageOutcome:
    started = time.perf_counter()
    before = lock_entry(repo_dir, stage)
    proc = subprocess.Popen(
        with_default_sigint([dvc_executable(), "repro", *(["--pull"] if pull else []), "--single-item", stage]),
        cwd=repo_dir, env=dvc_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    RUNNING[proc.pid] = proc
    lines: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            log(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        raise StageFailed(stage, f"timed out after {timeout_s:g} s; stopped it (raise its stage timeout)", None) from None
    finally:
        if proc.poll() is None:
            stop_group(proc)
        RUNNING.pop(proc.pid, None)
        reader.join(timeout=10)
    output = "".join(lines)
    if code != 0:
        ours, dvcs = _ERROR_LINE.findall(output), _DVC_ERROR.findall(output)
        message = ours[-1] if ours else (dvcs[-1] if dvcs else f"dvc exited with {code}")
        found = _EXIT_CODE.search(output)
        exit_code = int(found.group(1)) if found else None
        if "Unable to acquire lock" in output or "is being blocked by" in output:
            message, exit_code = "another dvc command holds this repo's lock; retry when it ends", TransientError.exit_code
        raise StageFailed(stage, message, exit_code)
    # DVC's record decides, not its log text: a run-cache hit runs nothing yet changes the workspace.
    executed = f"Running stage '{stage}'" in output
    changed = executed or lock_entry(repo_dir, stage) != before
    return StageOutcome(stage, ran=changed, seconds=time.perf_counter() - started,
                        from_run_cache=changed and not executed)


def git(repo_dir: Path, *args: str) -> str | None:
    """A git command's stripped stdout, or None when it fails (no such ref, no such file)."""
    completed = subprocess.run(["git", *args], cwd=repo_dir, capture_output=True, text=True)
    return completed.stdout.strip() if completed.returncode == 0 else None


class RemoteUnreachable(TransientError):
    pass


# What botocore, aiohttp and git say when the other end is down or the network is: worth a rerun.
_UNREACHABLE = re.compile(r"Could not connect|Connection refused|connection was closed|Cannot connect to host|"
                          r"timed out|Temporary failure in name resolution|Connect timeout|Unable to access|"
                          r"could not resolve host", re.IGNORECASE)
# Not git's "does not appear to be a git repository" nor "Could not read from remote": it says those
# of an origin moved or mistyped too, which no rerun mends; a host down comes with one of the above.


def unreachable(said: str) -> bool:
    """Whether a dvc or git command's output says a remote cannot be reached (rerun when it is up)."""
    return _UNREACHABLE.search(said) is not None


def dvc(repo_dir: Path, *args: str) -> str:
    """Run a dvc command, returning stdout; its error line becomes the exception message, a
    remote that cannot be reached a transient error (exit 75: rerun when it is back)."""
    result = subprocess.run([dvc_executable(), *args], cwd=repo_dir, env=dvc_environment(), capture_output=True,
                            text=True)
    if result.returncode != 0:
        errors = _DVC_ERROR.findall(result.stderr + result.stdout)
        line = errors[-1] if errors else result.stderr.strip()
        if unreachable(result.stderr + result.stdout):
            raise RemoteUnreachable(f"dvc {args[0]}: a remote is unreachable ({line}); check that it is up and "
                                    f"rerun: DVC writes each object whole, so nothing is half-written")
        raise CommandFailed(f"dvc {' '.join(args)}: {line}")
    return result.stdout


# One pipeline run per workspace at a time: DVC's own lock covers one `dvc` command, not the gap
# between two stages of a run, nor the params.yaml a run's overrides are written into.
WORKSPACE_LOCK = Path(".dvc/tmp/cifar10-flow.lock")


class WorkspaceBusy(TransientError):
    pass


@contextlib.contextmanager
def workspace_lock(repo: Path, timeout_s: float, holder: str) -> Iterator[None]:
    """The workspace for the block; another holder waits up to `timeout_s`, then fails clearly
    (naming who holds it: `holder` is written into the lock file)."""
    path = repo / WORKSPACE_LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    fh.seek(0)
                    other = fh.read().strip() or "another run"
                    raise WorkspaceBusy(
                        f"{other} is running the pipeline in {repo} ({path}); wait for it to finish, or wait longer "
                        f"with --lock-timeout SECONDS (the flow's lock_timeout_s, now {timeout_s:g} s)") from None
                time.sleep(1)
        fh.seek(0)
        fh.truncate()
        fh.write(holder)
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def overrides_applied(params_file: Path, overrides: dict[str, Any] | None, anything_ran: Callable[[], bool],
                      keep: bool = True) -> Iterator[None]:
    """params.yaml with the overrides for the block (checked first, as `run` checks them); as it
    was, byte for byte, afterwards when nothing ran, so a run that failed before any stage changed
    an output, or a dry run (keep=False), leaves no trace. Hold the workspace lock around it."""
    from stages.common import dataio
    from stages.common.params import update_params_file
    from stages.common.run_params import check_overrides

    original = params_file.read_bytes()
    check_overrides(params_file, overrides or {})
    if overrides:
        update_params_file(params_file, overrides)
    restore = True
    try:
        yield
        restore = not keep
    finally:
        if overrides and restore and not anything_ran():
            with dataio.atomic_path(params_file) as tmp:  # replaced whole, as update_params_file writes it
                tmp.write_bytes(original)

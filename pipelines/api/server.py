"""The inference API's server: uvicorn serving an export folder, one process or `--workers N`, and
which export that is (a folder, the workspace's, a git revision's from DVC's cache, or a registry
stage's, followed).

`cifar10-pipeline api` starts it."""

from __future__ import annotations

import functools
import os
import tempfile
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI

from pipelines.api.app import create_app
from pipelines.api.follow import StageFollower, exports_at
from pipelines.api.guards import HeadDeadlineProtocol
from pipelines.api.settings import Follow, Settings
from stages.common.serving import load_exported

# How the settings reach worker processes, which uvicorn starts afresh (spawned) and which build
# their own app, model and metrics from them.
SETTINGS_ENV = "CIFAR10_API_SETTINGS"


def build_app(settings: Settings) -> FastAPI:
    model, signature = load_exported(Path(settings.exports), settings.threads)
    if settings.follow is None:
        return create_app(model, signature, settings)
    signature["registry"] = {"stage": settings.follow.stage, "version": settings.follow.version}
    return create_app(model, signature, settings, StageFollower(settings.follow, settings.threads))


def app_from_environment() -> FastAPI:
    """Uvicorn's app factory in each worker process."""
    return build_app(Settings.from_json(os.environ[SETTINGS_ENV]))


def serve(settings: Settings, host: str, port: int, workers: int = 1) -> None:
    """Serve `settings.exports` on host:port. With several workers, each is a process with its own
    model, ONNX Runtime's threads shared out between them unless `settings.threads` says; their
    Prometheus metrics are added up through files in a temporary folder (prometheus_client's
    multiprocess mode)."""
    import uvicorn

    protocol = functools.partial(HeadDeadlineProtocol, head_timeout_s=settings.limits.head_timeout_s)
    if workers == 1:
        uvicorn.run(build_app(settings), host=host, port=port, log_level="info", http=protocol)
        return
    load_exported(Path(settings.exports), 1)  # a missing or broken export is one line here, not N tracebacks
    threads = settings.threads or max(1, len(os.sched_getaffinity(0)) // workers)
    with tempfile.TemporaryDirectory(prefix="cifar10-api-metrics-") as metrics_dir:
        os.environ[SETTINGS_ENV] = replace(settings, threads=threads).to_json()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        uvicorn.run(f"{__name__}:app_from_environment", factory=True, workers=workers, host=host, port=port,
                    log_level="info", http=protocol)


def serve_revision(repo: Path, rev: str, exports: Path, settings: Settings, host: str, port: int,
                   workers: int = 1) -> None:
    from pipelines.dvcrepo import git

    with tempfile.TemporaryDirectory(prefix="cifar10-api-") as tmp:
        folder = exports_at(repo, rev, exports, Path(tmp) / "export")
        commit = git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
        serve(replace(settings, exports=str(folder), git_rev=commit), host, port, workers)


def serve_stage(repo: Path, stage: str, exports: Path, settings: Settings, host: str, port: int, workers: int = 1,
                poll_s: float = 30.0) -> None:
    """The version GTO assigns to `stage`, followed: each server process polls origin's tags every
    `poll_s` seconds and switches to the version the stage moves to."""
    follow = Follow(str(repo), stage, exports.as_posix(), poll_s)
    found = StageFollower(follow, settings.threads).current()
    with tempfile.TemporaryDirectory(prefix="cifar10-api-") as tmp:
        folder = exports_at(repo, found.commit, exports, Path(tmp) / "export")
        serve(replace(settings, exports=str(folder), git_rev=found.commit, follow=replace(follow, version=found.version)),
              host, port, workers)


def serve_workspace(repo: Path, exports: Path, settings: Settings, host: str, port: int, workers: int = 1) -> None:
    """The workspace's export, named by HEAD when HEAD's dvc.lock records this very export."""
    serve(replace(settings, exports=str(repo / exports), git_rev=committed_at_head(repo, exports)), host, port, workers)


def committed_at_head(repo: Path, exports: Path) -> str | None:
    import yaml

    from pipelines.dvcrepo import git

    def export_hash(lock_text: str | None) -> object:
        try:
            lock = yaml.safe_load(lock_text or "") or {}
            return next((out.get("md5") for entry in lock.get("stages", {}).values() for out in entry.get("outs", [])
                         if out.get("path") == exports.as_posix()), None)
        except (yaml.YAMLError, AttributeError):
            return None

    lock = repo / "dvc.lock"
    here = export_hash(lock.read_text() if lock.is_file() else None)
    if here is None or export_hash(git(repo, "show", "HEAD:dvc.lock")) != here:
        return None
    return git(repo, "rev-parse", "HEAD")

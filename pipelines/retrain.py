"""Continuous training: each flow run retrains on origin's newest commit, keeps the run as a
commit there, and promotes its model when it holds up against the registry's champion.

A flow run of `cifar10-retrain`:
1. brings a clone of origin to the newest commit of `branch` (the clone is kept between runs in
   `workdir`, so outputs that did not change stay; what an earlier run left is discarded);
2. runs the pipeline there: DVC reruns the stages whose code, params or data changed, and restores
   from the DVC remote's run-cache what was computed before;
3. when the run changed dvc.lock or the metrics, pushes outputs and run-cache to the DVC remote,
   commits the run ("retrain: ...") and pushes the commit to origin's `branch`; when nothing
   changed it stops there, a no-op that says so;
4. gates the run against the version GTO assigns to `champion` (prod): a pass registers the new
   commit, assigns it the stage and pushes the tags (an API following the stage switches); a fail
   promotes nothing and fails the flow run with the verdict (artifact `cifar10-gate`, and the
   alert).

The run is a commit rather than an experiment: a version in GTO is a git tag on a commit, and the
next scheduled run must find the branch's newest commit up to date to be a no-op. So the branch
holds every retrain's run, promoted or not (`compare --all` shows them); `prod` holds the model
that passed.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, runtime
from prefect.artifacts import create_markdown_artifact

from pipelines.dvcrepo import RemoteUnreachable, git, git_tracked_outputs, unreachable
from pipelines.flow import pipeline, publish_gate_verdict, push_outputs
from pipelines.gate import promote_champion
from pipelines.registry import fetch_origin_tags, stage_version
from pipelines.runs import run_record
from stages.common.errors import CommandFailed, TransientError

RETRAIN_FLOW = "cifar10-retrain"
RETRAIN_ENTRYPOINT = "pipelines/retrain.py:retrain"
RETRAIN_ARTIFACT = "cifar10-retrain"
# Used only where git has no identity configured (a fresh worker machine): the commits and the
# GTO tags say which machine made them.
BOT_NAME = "cifar10-pipeline retrain"


def default_workdir(git_url: str, branch: str) -> Path:
    """Where a machine keeps its clone of origin for retraining: in the user's cache, one per
    remote and branch."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", git_url).strip("_")[-60:]
    digest = hashlib.sha256(f"{git_url}\0{branch}".encode()).hexdigest()[:8]
    return cache / "cifar10-pipeline" / "retrain" / f"{readable}-{branch}-{digest}"


def _git(repo: Path, *args: str, what: str) -> str:
    """A git command that must succeed; its first fatal line (git's advice follows it), and whether
    origin was unreachable, decide the error."""
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    if done.returncode != 0:
        said = done.stderr.strip().splitlines()
        reason = next((line for line in said if line.startswith(("fatal:", "error:"))),
                      said[-1] if said else f"exit {done.returncode}")
        if unreachable(done.stderr):
            raise RemoteUnreachable(f"{what}: origin cannot be reached ({reason}); rerun when it is up")
        raise CommandFailed(f"{what}: {reason}")
    return done.stdout.strip()


def checkout_newest(git_url: str, branch: str, workdir: Path) -> str:
    """`workdir` as a clone of `git_url` at the newest commit of `branch`, tracked files as that
    commit has them and untracked ones removed (ignored ones, DVC's outputs and cache, stay);
    returns the commit."""
    if not (workdir / ".git").is_dir():
        workdir.parent.mkdir(parents=True, exist_ok=True)
        _git(workdir.parent, "clone", "--quiet", "--no-checkout", git_url, str(workdir), what=f"git clone {git_url}")
    else:
        _git(workdir, "remote", "set-url", "origin", git_url, what="git remote set-url")
    _git(workdir, "fetch", "--quiet", "--prune", "--force", "origin", f"+refs/heads/{branch}:refs/remotes/origin/{branch}",
         what=f"git fetch origin {branch}")
    _git(workdir, "reset", "--quiet", "--hard", what="git reset")
    _git(workdir, "checkout", "--quiet", "--force", "-B", branch, f"origin/{branch}", what=f"git checkout {branch}")
    _git(workdir, "clean", "--quiet", "--force", "-d", what="git clean")
    if not git(workdir, "config", "user.email"):
        git(workdir, "config", "user.name", BOT_NAME)
        git(workdir, "config", "user.email", f"cifar10-retrain@{socket.gethostname()}")
    return _git(workdir, "rev-parse", "HEAD", what="git rev-parse")


def changed_run_files(repo: Path) -> list[str]:
    """The files of a run (dvc.lock, git-tracked outputs, the .gitignore files DVC keeps) that
    differ from the commit."""
    paths = [*run_record(repo), *git_tracked_outputs(repo), ":(glob)**/.gitignore"]
    changed = git(repo, "diff", "--name-only", "HEAD", "--", *paths) or ""
    new = git(repo, "ls-files", "--others", "--exclude-standard", "--", *paths) or ""
    return [*changed.splitlines(), *new.splitlines()]


def commit_run(repo: Path, branch: str, origin_commit: str) -> str:
    """The run committed on top of origin's commit and pushed to origin's `branch`; the commit."""
    files = changed_run_files(repo)
    _git(repo, "add", "--all", "--", *files, what="git add")
    name = runtime.flow_run.name or "a flow run"
    _git(repo, "commit", "--quiet", "-m", f"retrain: the run of {origin_commit[:7]} (flow run {name})",
         "-m", "Committed by the cifar10-retrain flow: dvc.lock and the run's metrics and plots.",
         what="git commit")
    commit = _git(repo, "rev-parse", "HEAD", what="git rev-parse")
    pushed = subprocess.run(["git", "push", "--quiet", "origin", f"HEAD:refs/heads/{branch}"], cwd=repo,
                            capture_output=True, text=True)
    if pushed.returncode != 0:
        reason = (pushed.stderr.strip().splitlines() or ["no reason given"])[-1]
        raise TransientError(f"the run of {origin_commit[:7]} could not be pushed to origin's {branch} ({reason}); "
                             "if origin moved meanwhile, the next run retrains on its newest commit and restores "
                             "what did not change from the DVC remote's run-cache")
    return commit


@flow(name=RETRAIN_FLOW, log_prints=True)
def retrain(
    git_url: str,
    branch: str = "main",
    champion: str = "prod",
    workdir: str | None = None,
    stage_timeouts: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Retrain on the newest commit of origin's `branch`, commit and push the run, and promote its
    model to `champion` when it passes the quality gate against the version there."""
    logger = get_run_logger()
    started = time.perf_counter()
    repo = Path(workdir) if workdir else default_workdir(git_url, branch)
    origin_commit = checkout_newest(git_url, branch, repo)
    logger.info(f"origin's {branch} is at {origin_commit[:7]} (clone in {repo})")
    result = pipeline.fn(repo_dir=str(repo), pull=True, stage_timeouts=stage_timeouts)
    stages = "; ".join(fate["outcome"] for fate in result["stages"].values())
    summary: dict[str, Any] = {"origin": origin_commit, "branch": branch, "stages": result["stages"],
                               "metrics": result["metrics"], "committed": None, "gate": None, "promoted": None}
    if changed_run_files(repo):
        push_outputs(repo)  # before the commit that names them reaches origin
        summary["committed"] = commit_run(repo, branch, origin_commit)
        logger.info(f"committed the run as {summary['committed'][:7]} and pushed it to origin's {branch}")
    else:
        fetch_origin_tags(repo)
        if stage_version(repo, champion) is not None:
            summary["seconds"] = round(time.perf_counter() - started, 1)
            line = (f"No change: origin's {branch} at {origin_commit[:7]} already holds its run ({stages}); "
                    f"nothing retrained, committed or promoted ({summary['seconds']} s)")
            logger.info(line)
            create_markdown_artifact(line, key=RETRAIN_ARTIFACT, description="What the retrain did")
            return summary
        logger.info(f"no version holds '{champion}' yet: the run at {origin_commit[:7]} is gated to be its first")
    verdict = publish_gate_verdict(repo, champion)
    summary["gate"] = verdict.passed
    if verdict.passed:
        summary["promoted"] = promote_champion(repo, verdict, champion, None)
        logger.info(summary["promoted"])
    summary["seconds"] = round(time.perf_counter() - started, 1)
    create_markdown_artifact("\n".join([
        f"Retrained on origin's {branch} at {origin_commit[:7]}: {stages}.",
        "",
        f"Committed as {summary['committed'][:7]}." if summary["committed"] else "Nothing new to commit.",
        "",
        verdict.markdown(),
        summary["promoted"] or f"Nothing promoted: '{champion}' keeps its version.",
    ]), key=RETRAIN_ARTIFACT, description="What the retrain did")
    verdict.raise_if_failed()
    return summary

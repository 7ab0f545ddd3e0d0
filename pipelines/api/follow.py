"""Which export the API serves when it is not a folder: a git revision's, read from DVC's cache or
remote, or the version GTO assigns to a registry stage, followed as the stage moves.

Each server process polls (pipelines/api/app.py runs `StageFollower.poll` on a thread): it fetches
origin's tags when the repo has an origin, asks GTO which version the stage holds and, when that
moved, reads the version's export from DVC's cache or remote and loads it. The app then swaps the
model between two batches, so no request fails and each is answered by one version whole.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipelines.api.settings import Follow
from pipelines.registry import StageVersion, fetch_origin_tags, stage_version
from stages.common.errors import ConfigError, DataError, TransientError
from stages.common.serving import OnnxClassifier, load_exported

log = logging.getLogger("uvicorn.error")


def exports_at(repo: Path, rev: str, exports: Path, dest: Path) -> Path:
    """The export folder as it was at a git revision (a commit, a branch, a GTO tag such as
    cifar10-classifier@v0.0.1), from DVC's cache or remote."""
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from scmrepo.exceptions import SCMError

    try:
        fs = DVCFileSystem(str(repo), rev=rev)
    except (SCMError, DvcException) as err:
        raise ConfigError(f"revision '{rev}' not found in {repo} ({err}); pass a commit, branch or tag") from None
    try:
        fs.get(exports.as_posix(), str(dest), recursive=True)
    except (FileNotFoundError, DvcException) as err:
        raise DataError(f"{exports} at '{rev}' cannot be read ({err}); that revision has no export, "
                        "or its files are in no cache: `dvc pull` first") from None
    return dest


def load_version(repo: Path, exports: Path, found: StageVersion, threads: int) -> tuple[OnnxClassifier, dict[str, Any]]:
    """The export at the version's commit, loaded; its files are read into memory, then removed."""
    folder = Path(tempfile.mkdtemp(prefix="cifar10-api-stage-"))
    try:
        model, signature = load_exported(exports_at(repo, found.commit, exports, folder / "export"), threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return model, {**signature, "git_rev": found.commit}


class StageFollower:
    def __init__(self, follow: Follow, threads: int) -> None:
        self.follow, self.threads = follow, threads
        self.serving = follow.version

    def look(self) -> StageVersion | None:
        """The stage's version on origin now (its tags fetched first), None when it holds none."""
        repo = Path(self.follow.repo)
        try:
            fetch_origin_tags(repo)
        except TransientError as err:  # serving goes on: the tags fetched last time decide until origin is back
            log.warning("stage %s: %s", self.follow.stage, err)
        return stage_version(repo, self.follow.stage)

    def current(self) -> StageVersion:
        """The stage's version now; a one-line error when the stage holds none."""
        found = self.look()
        if found is None:
            raise ConfigError(f"no version of the model is assigned to stage '{self.follow.stage}' in {self.follow.repo}; "
                              f"assign one (`cifar10-pipeline register --stage {self.follow.stage}`)")
        return found

    def poll(self) -> tuple[OnnxClassifier, dict[str, Any]] | None:
        """The new version's model when the stage moved since the last poll, else None. A failed
        poll is logged and changes nothing: the server keeps answering with what it has."""
        try:
            found = self.look()
            if found is None or found.version == self.serving:
                return None
            model, signature = load_version(Path(self.follow.repo), Path(self.follow.exports), found, self.threads)
        except (ConfigError, DataError) as err:
            log.warning("stage %s: %s; still serving %s", self.follow.stage, err, self.serving)
            return None
        log.info("stage %s moved to %s: switching from %s", self.follow.stage, found.version, self.serving)
        self.serving = found.version
        return model, {**signature, "registry": {"stage": self.follow.stage, "version": found.version}}

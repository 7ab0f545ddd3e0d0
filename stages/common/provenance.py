"""Where an artifact came from: the code revision and the model file's hash (DVC's md5 of a file),
written into the report's model card and the export's signature.json alike."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from stages.common.errors import DataError


def file_md5(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path} not found; run `dvc repro train` first")
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "md5").hexdigest()


def code_revision() -> str:
    """The git commit the stages ran from, marked when stage code had uncommitted changes."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "stages", "dvc.yaml"], capture_output=True, text=True)
    return head.stdout.strip() + (" + uncommitted changes to stages/ or dvc.yaml" if dirty.stdout.strip() else "")

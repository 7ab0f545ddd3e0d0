from __future__ import annotations

import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from tests import synthetic

REPO = Path(__file__).resolve().parents[1]

# Nothing may wait on the network: this machine reaches no analytics host.
os.environ.update(DVC_NO_ANALYTICS="1", GX_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", KERAS_BACKEND="tensorflow")
# Stages' output must stream line by line: tests act on "Epoch N/M" as it appears.
os.environ["PYTHONUNBUFFERED"] = "1"


@pytest.fixture
def http_server(tmp_path):
    """A real HTTP server on 127.0.0.1 serving tmp_path/www; yields (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run a stage's main() in an empty folder with the repo's params.yaml."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def set_params(path: Path, **sections: dict) -> None:
    """Update keys of params.yaml sections, e.g. set_params(p, train={"epochs": 1})."""
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


TINY_TRAIN, TINY_TEST = 20, 5


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tiny_params(archive: Path) -> dict[str, dict]:
    """Params for a generated dataset of TINY_TRAIN/TINY_TEST images per class, 1 epoch."""
    return {
        # A local source is pinned by its checksum (DVC cannot watch a file outside the repo).
        "download": {"source": str(archive), "md5": None, "sha256": sha256_of(archive)},
        "validate": {"expected_per_class": {"train": TINY_TRAIN, "test": TINY_TEST}},
        "train": {"epochs": 1, "batch_size": 32},
        "report": {"misclassified": 4, "samples_per_class": 2},
    }


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.tar.gz"
    return synthetic.write_tar_gz(path, synthetic.class_folder_files(TINY_TRAIN, TINY_TEST))


def stage_command(verb: str) -> list[str]:
    """The stage's command as dvc.yaml writes it, with its `${paths.*}` filled in as DVC does."""
    from stages.common.paths import artifact_paths

    cmd = " ".join(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][verb]["cmd"].split())
    paths = artifact_paths(REPO)
    return re.sub(r"\$\{paths\.(\w+)\}", lambda m: str(paths[m.group(1)]), cmd).split()


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

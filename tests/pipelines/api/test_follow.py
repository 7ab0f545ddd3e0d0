"""`cifar10-pipeline api --stage prod`: the API serves the version GTO assigns to a stage and
switches when the stage moves on origin, while a client keeps sending requests."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers import ENV, cli, inference_api
from tests.synthetic import png_bytes

pytestmark = pytest.mark.slow  # starts the inference API

PNG = png_bytes(np.full((32, 32, 3), (10, 120, 200), np.uint8))
DVC_YAML = """\
vars:
  - paths:
      exports: models/export
stages:
  export:
    cmd: "true"
    outs:
      - ${paths.exports}
artifacts:
  cifar10-classifier:
    path: ${paths.exports}
    type: model
"""


def run(repo: Path, *args: str) -> str:
    return subprocess.run(args, cwd=repo, env=ENV, check=True, capture_output=True, text=True).stdout


def commit_version(repo: Path, exported: Path, version: str) -> None:
    """The export with `version` in its signature, committed through DVC and git, registered as the
    next version and assigned to prod."""
    folder = repo / "models" / "export"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(exported, folder)
    signature = json.loads((folder / "signature.json").read_text())
    (folder / "signature.json").write_text(json.dumps({**signature, "version": version}))
    run(repo, "dvc", "commit", "--force", "--quiet", "export")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "--quiet", "-m", f"model {version}")
    registered = cli(ENV, "register", "--stage", "prod", "--repo", str(repo))
    assert registered.returncode == 0, registered.stderr


@pytest.fixture
def origin(tmp_path, exported):
    repo = tmp_path / "origin"
    repo.mkdir()
    run(repo, "git", "init", "--quiet")
    run(repo, "git", "config", "user.email", "t@example.com")
    run(repo, "git", "config", "user.name", "t")
    run(repo, "dvc", "init", "--quiet")
    (repo / "dvc.yaml").write_text(DVC_YAML)
    commit_version(repo, exported, "model-one")
    return repo


def test_the_api_follows_the_prod_stage_without_failing_a_request(origin, exported, tmp_path):
    served = tmp_path / "served"
    run(tmp_path, "git", "clone", "--quiet", str(origin), str(served))
    run(served, "dvc", "cache", "dir", "--local", str(origin / ".dvc" / "cache"))  # the team's shared cache
    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client(url: str) -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                response = http.post(f"{url}/predict", files=[("files", ("a.png", PNG))])
                answers.append((response.status_code, response.json().get("version")))

    with inference_api("--stage", "prod", "--poll", "0.5", "--repo", str(served)) as (url, _):
        first = httpx.get(f"{url}/metadata").json()
        assert first["registry"] == {"stage": "prod", "version": "v0.0.1"} and first["version"] == "model-one"
        sender = threading.Thread(target=client, args=(url,))
        sender.start()
        commit_version(origin, exported, "model-two")  # prod moves to v0.0.2 on origin
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/metadata").json()["registry"]["version"] != "v0.0.2":
            assert time.monotonic() < deadline, "the API did not switch to v0.0.2"
            time.sleep(0.2)
        time.sleep(1)
        stop.set()
        sender.join()
        after = httpx.get(f"{url}/metadata").json()
    assert after["version"] == "model-two"
    assert after["git_rev"] == run(origin, "git", "rev-parse", "HEAD").strip()
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [version for _, version in answers]
    switched = versions.index("model-two")
    print(f"{len(answers)} requests, {sum(s != 200 for s, _ in answers)} failed, {switched} answered by model-one "
          f"then {len(versions) - switched} by model-two")
    assert set(versions[:switched]) == {"model-one"} and set(versions[switched:]) == {"model-two"}


def test_a_stage_with_no_version_is_one_line(origin):
    result = cli(ENV, "api", "--stage", "staging", "--repo", str(origin), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: no version of the model is assigned to stage 'staging' in {origin}; "
                                     "assign one (`cifar10-pipeline register --stage staging`)")

"""What `--pool` refuses before anything is submitted: each a one-line error naming the fix."""

import subprocess

import pytest

from tests.helpers import BIN, dvc, git_dvc_project

pytestmark = pytest.mark.slow  # against a Prefect server


def pool_run(repo, env) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "cifar10-pipeline"), "run", "--pool", "cpu"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_pool_needs_a_prefect_server(tmp_path, prefect_env):
    repo = git_dvc_project(tmp_path / "repo")
    env = {k: v for k, v in prefect_env.items() if k != "PREFECT_API_URL"}
    done = pool_run(repo, env)
    assert done.returncode == 2 and "set PREFECT_API_URL" in done.stderr
    assert done.stderr.strip().count("\n") == 0


@pytest.mark.parametrize("missing", ["origin", "dvc remote", "pushed HEAD"])
def test_a_pool_needs_origin_a_dvc_remote_and_head_pushed(tmp_path, prefect_env, missing):
    repo = git_dvc_project(tmp_path / "repo")
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", str(origin)], check=True)
    if missing != "origin":
        subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=repo, check=True)
    if missing != "dvc remote":
        dvc(repo, "remote", "add", "-d", "storage", str(tmp_path / "store"))
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@e.invalid", "commit", "-qam", "remote"],
                       cwd=repo, check=True)
    done = pool_run(repo, prefect_env)
    expected = {"origin": "no git remote 'origin'", "dvc remote": "no default DVC remote",
                "pushed HEAD": "is not on origin; `git push` it first"}[missing]
    assert done.returncode == 2 and expected in done.stderr, done.stderr
    assert done.stderr.strip().count("\n") == 0

import json
import subprocess

from pipelines.runs import experiment_baselines, experiment_commit, experiment_metrics
from stages.common.paths import evaluation_files
from tests.helpers import commit_experiment, git_dvc_project


def test_an_experiments_metrics_are_read_from_its_own_commit_and_one_without_them_is_left_out(tmp_path):
    repo = git_dvc_project(tmp_path / "project")
    metrics = evaluation_files(repo)["metrics"]
    commit_experiment(repo, "s-1", {metrics: json.dumps({"accuracy": 0.5, "loss": 1.2})})
    commit_experiment(repo, "s-2", {"params.yaml": "train: {}\n"})  # evaluate never wrote its metrics
    commit_experiment(repo, "s-3", {metrics: "{not json"})
    subprocess.run(["git", "update-ref", "refs/exps/celery/stash", "HEAD"], cwd=repo, check=True)  # DVC's queue's own
    assert experiment_metrics(repo, {"s-1", "s-2", "s-3", "stash", "s-9"}) == {"s-1": {"accuracy": 0.5, "loss": 1.2}}
    assert experiment_commit(repo, "stash") is None


def test_a_name_on_several_baselines_is_heads_experiment(tmp_path):
    repo = git_dvc_project(tmp_path / "project")
    metrics = evaluation_files(repo)["metrics"]
    old = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "commit", "-q", "--allow-empty",
                    "-m", "next"], cwd=repo, check=True)
    on_head = commit_experiment(repo, "s-1", {metrics: json.dumps({"accuracy": 0.9})})
    commit_experiment(repo, "s-1", {metrics: json.dumps({"accuracy": 0.1})}, baseline=old)
    assert experiment_commit(repo, "s-1") == on_head
    assert experiment_metrics(repo, {"s-1"}) == {"s-1": {"accuracy": 0.9}}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True).stdout
    assert sorted(experiment_baselines(repo)) == sorted([old, head.strip()])


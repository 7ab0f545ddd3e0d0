"""The flow's own logic (stage order, skipping, retries, params handling) under Prefect's test
harness, with DVC replaced by a recording fake; test_flow.py runs the real thing on a server."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from pipelines import flow
from pipelines.dvcrepo import StageGraph, StageOutcome
from stages.common.errors import StageFailed
from tests.helpers import REPO

pytestmark = pytest.mark.slow  # runs the flow on a temporary Prefect server

GRAPH = StageGraph(order=["download", "prepare", "train"],
                   upstream={"download": [], "prepare": ["download"], "train": ["prepare"]})


@pytest.fixture(scope="module", autouse=True)
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


class FakeDvc:
    """Stands in for `dvc repro --single-item`: records each call, fails as told."""

    def __init__(self, changes: set[str], failures: dict[str, list[int]] | None = None):
        self.changes, self.failures, self.calls = changes, failures or {}, []

    def run_stage(self, repo: Path, stage: str, log=print, timeout_s=None, pull=False) -> StageOutcome:
        self.calls.append(stage)
        codes = self.failures.get(stage)
        if codes:
            raise StageFailed(stage, "boom", codes.pop(0))
        return StageOutcome(stage, ran=stage in self.changes, seconds=0.1)


@pytest.fixture
def project(tmp_path, monkeypatch):
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    # DVC finds download stale (a changed param, say), and nothing stale once the run is over.
    monkeypatch.setattr(flow, "inspect_repo", lambda repo: (GRAPH, {"download": ["param download: changed"]}))
    monkeypatch.setattr(flow, "assert_nothing_stale", lambda repo, stages: None)
    # The task's own retry policy, without its back-off delays.
    monkeypatch.setattr(flow, "download_task", flow.download_task.with_options(retry_delay_seconds=0))
    return tmp_path


def test_a_stage_runs_when_stale_or_when_its_upstream_changed(project, monkeypatch):
    fake = FakeDvc(changes={"download"})
    monkeypatch.setattr(flow, "run_stage", fake.run_stage)
    result = flow.pipeline(repo_dir=str(project))
    assert fake.calls == ["download", "prepare"]  # prepare's input changed; train's did not
    assert [s["outcome"] for s in result["stages"].values()] == \
        ["download: ran 0 s", "prepare: up to date", "train: up to date"]


def test_a_transient_download_failure_is_retried_and_others_are_not(project, monkeypatch):
    fake = FakeDvc(changes=set(), failures={"download": [75, 75]})
    monkeypatch.setattr(flow, "run_stage", fake.run_stage)
    flow.pipeline(repo_dir=str(project))
    assert fake.calls == ["download"] * 3

    fake = FakeDvc(changes=set(), failures={"download": [4]})
    monkeypatch.setattr(flow, "run_stage", fake.run_stage)
    with pytest.raises(StageFailed) as failed:
        flow.pipeline(repo_dir=str(project))
    assert fake.calls == ["download"] and failed.value.exit_code == 4


def test_params_are_restored_unless_a_stage_changed_an_output(project, monkeypatch):
    params = project / "params.yaml"
    before = params.read_bytes()
    fake = FakeDvc(changes=set(), failures={"download": [3]})
    monkeypatch.setattr(flow, "run_stage", fake.run_stage)
    with pytest.raises(StageFailed):
        flow.pipeline(repo_dir=str(project), overrides={"train.epochs": 2})
    assert params.read_bytes() == before  # nothing ran: no trace of the override

    assert flow.pipeline(repo_dir=str(project), overrides={"train.epochs": 2}, dry_run=True)["plan"]
    assert params.read_bytes() == before

    fake = FakeDvc(changes={"download"}, failures={"prepare": [3]})
    monkeypatch.setattr(flow, "run_stage", fake.run_stage)
    with pytest.raises(StageFailed):
        flow.pipeline(repo_dir=str(project), overrides={"prepare.seed": 3})
    assert "seed: 3" in params.read_text()  # download ran with it: the params must say so


GPU_GRAPH = StageGraph(order=["prepare", "train", "evaluate", "report"],
                       upstream={"prepare": [], "train": ["prepare"], "evaluate": ["prepare", "train"],
                                 "report": ["evaluate"]},
                       gpu=frozenset({"train", "evaluate"}))


@pytest.mark.parametrize("stale", [{"prepare"}, set()])
def test_gpu_stages_go_to_the_gpu_pool_together_and_the_rest_run_here(project, monkeypatch, stale):
    fake = FakeDvc(changes={"prepare", "report"})
    monkeypatch.setattr(flow, "run_stage", fake.run_stage)
    monkeypatch.setattr(flow, "inspect_repo", lambda repo: (GPU_GRAPH, {s: ["changed"] for s in stale}))
    sent = []

    def on_pool(repo, stages, inputs, pool, handback, timeouts, log):
        sent.append((stages, inputs, pool))
        return [StageOutcome(stage, ran=True, seconds=1.0, pool=pool) for stage in stages]

    monkeypatch.setattr(flow, "run_stages_on_pool", on_pool)
    result = flow.pipeline(repo_dir=str(project), gpu_pool="gpu")
    if stale:
        assert sent == [(["train", "evaluate"], ["prepare"], "gpu")]  # one flow run for both
        assert fake.calls == ["prepare", "report"]
        assert result["stages"]["evaluate"]["outcome"] == "evaluate: ran 1 s on work pool 'gpu'"
    else:  # up to date: nothing is sent anywhere
        assert sent == [] and fake.calls == []

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.dvcrepo import StageFailed, StageGraph, StageOutcome, _reasons, inspect_repo, plan
from stages.common.errors import ConfigError
from stages.common.params import update_params_file
from stages.common.run_params import check_overrides
from tests.helpers import git_dvc_project

GRAPH = StageGraph(order=["a", "b", "c", "d", "e"], upstream={"a": [], "b": ["a"], "c": ["b"], "d": [], "e": ["b", "c"]})


def test_plan_says_why_and_what_may_follow():
    fate = plan(GRAPH, {"b": ["param b: b.x 1 -> 2"]})
    assert fate == {
        "a": "up to date",
        "b": "will run: param b: b.x 1 -> 2",
        "c": "may run: if b changes its outputs",
        "d": "up to date",
        "e": "may run: if b or c change their outputs",
    }


def test_reasons_name_the_changed_param_keys(tmp_path):
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  b:\n    params:\n      params.yaml:\n        b:\n          x: 1\n          y: 5\n")
    (tmp_path / "params.yaml").write_text("b:\n  x: 2\n  y: 5\n")
    status = {"b": [{"changed deps": {"params.yaml": {"b": "modified"}}}], "a": [{"changed outs": {"data/raw": "deleted"}}]}
    assert _reasons(tmp_path, status) == {"b": ["param b: b.x 1 -> 2"], "a": ["changed outs: data/raw deleted"]}


def test_outcome_and_failure_wording():
    assert StageOutcome("train", True, 312.4).describe() == "train: ran 312 s"
    assert StageOutcome("download", False, 0.0).describe() == "download: up to date"
    assert StageFailed("download", "x", 75).transient and not StageFailed("validate", "x", 3).transient
    assert StageFailed("validate", "x", 3).exit_code == 3
    assert StageFailed("train", "timed out", None).exit_code == StageFailed("train", "killed", -9).exit_code == 1


def test_overrides_keep_comments_and_refuse_unknown_keys(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train:\n  epochs: 10   # how long\n  lr: 0.1\n")
    check_overrides(params, {"train.epochs": 3}, values=False)  # a toy params.yaml: keys only
    update_params_file(params, {"train.epochs": 3})
    assert params.read_text() == "train:\n  epochs: 3    # how long\n  lr: 0.1\n"
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        check_overrides(params, {"train.epoch": 3})
    with pytest.raises(ConfigError, match="names no key"):
        check_overrides(params, {"evaluate.split": "val"})


def test_a_run_cache_restore_counts_as_a_change():
    restored = StageOutcome("download", True, 0.4, from_run_cache=True)
    assert restored.describe() == "download: restored from run-cache" and restored.ran


def test_set_values_reach_dvc_as_yaml_it_reads_back(tmp_path):
    """`dvc exp run -S` reads values as YAML; yaml.safe_dump(5) gave '5\\n...', which it refused."""
    from pipelines.launch import fallback_command
    from stages.common.params import load_yaml

    command = fallback_command({"train.epochs": 5, "train.learning_rate": 1e-3, "train.optimizer": "sgd",
                                "prepare.train_limit_per_class": None, "train.arch": {"resnet": {"widths": [8]}}},
                               dry_run=True)
    assert command[1:3] == ["exp", "run"] and command[-1] == "--dry"
    sets = dict(arg.split("=", 1) for arg in command[3:-1] if arg != "-S")
    assert {k: load_yaml(v) for k, v in sets.items()} == {
        "train.epochs": 5, "train.learning_rate": 0.001, "train.optimizer": "sgd",
        "prepare.train_limit_per_class": None, "train.arch": {"resnet": {"widths": [8]}}}
    assert all("\n" not in v for v in sets.values())
    assert fallback_command({}, dry_run=False)[1:] == ["repro"]


def test_cli_reads_set_values_as_yaml_1_2():
    from stages.common.params import parse_assignments as parse_overrides

    assert parse_overrides(["train.learning_rate=1e-3", "train.epochs=3", "x=null", "y=[1, 2]"]) == {
        "train.learning_rate": 0.001, "train.epochs": 3, "x": None, "y": [1, 2]}


def test_stopping_a_stage_returns_as_soon_as_its_process_group_is_gone():
    """An unreaped leader kept answering killpg(pgid, 0): every stop waited the full grace period."""
    import subprocess
    import sys
    import time

    from pipelines.dvcrepo import stop_group

    # The child handles SIGINT as a stage does, also when these tests run as a background job
    # (which would hand it an ignored SIGINT, and the stop would wait out its grace period).
    child = "import signal, time; signal.signal(signal.SIGINT, signal.default_int_handler); print('up', flush=True); " \
            "time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "up"
    started = time.monotonic()
    stop_group(proc, grace_s=15.0)
    assert time.monotonic() - started < 3.0 and proc.returncode is not None


def test_experiment_names_carry_the_flow_run_id():
    from pipelines.flow import experiment_name

    first = experiment_name("brave-owl", "0b3f7a2c-1111-2222-3333-444455556666")
    second = experiment_name("brave-owl", "9e8d7c6b-1111-2222-3333-444455556666")
    assert first == "prefect-brave-owl-0b3f7a2c" and first != second


def probe_repo(root: Path) -> Path:
    """A git + DVC repo with one stage that records its param and the SIGINT disposition it got."""
    import subprocess
    import sys

    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "-q"], cwd=root, check=True)
    script = ("import signal, yaml; x = yaml.safe_load(open('params.yaml'))['probe']['x']; "
              "open('out.txt', 'w').write(f'{x} {signal.getsignal(signal.SIGINT)}')")
    (root / "dvc.yaml").write_text(f"stages:\n  probe:\n    cmd: {sys.executable} -c \"{script}\"\n"
                                   "    params: [probe.x]\n    outs: [out.txt]\n")
    (root / "params.yaml").write_text("probe:\n  x: 1\n")
    return root


def test_run_stage_counts_a_run_cache_restore_as_a_change(tmp_path):
    """DVC prints no 'Running stage' for a run-cache hit, yet the workspace's outputs change."""
    from pipelines.dvcrepo import run_stage

    repo = probe_repo(tmp_path / "repo")
    assert run_stage(repo, "probe", log=lambda line: None).ran
    (repo / "params.yaml").write_text("probe:\n  x: 2\n")
    assert run_stage(repo, "probe", log=lambda line: None).ran
    assert (repo / "out.txt").read_text().startswith("2 ")
    (repo / "params.yaml").write_text("probe:\n  x: 1\n")  # back to the first run: DVC restores it
    restored = run_stage(repo, "probe", log=lambda line: None)
    assert restored.ran and restored.from_run_cache
    assert (repo / "out.txt").read_text().startswith("1 ")
    assert not run_stage(repo, "probe", log=lambda line: None).ran  # now really up to date


def test_stages_get_sigint_at_its_default_even_when_the_flow_ignores_it(tmp_path):
    """A flow started as a background job ignores SIGINT; its stages must still be stoppable."""
    import signal

    from pipelines.dvcrepo import run_stage

    repo = probe_repo(tmp_path / "repo")
    inherited = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run_stage(repo, "probe", log=lambda line: None)
    finally:
        signal.signal(signal.SIGINT, inherited)
    assert "default_int_handler" in (repo / "out.txt").read_text()


def test_the_gpu_stages_are_those_dvc_yaml_marks(tmp_path):
    graph, _ = inspect_repo(git_dvc_project(tmp_path / "project"))
    assert graph.gpu == {"train", "evaluate"}


def test_stages_run_with_the_clis_interpreter_whatever_path_holds(tmp_path, monkeypatch):
    """`.venv/bin/cifar10-pipeline run` without the venv activated ran the stages with the system
    Python (ModuleNotFoundError deep in the log)."""
    from pipelines.dvcrepo import run_stage

    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text("stages:\n  probe:\n    cmd: python -c \"import sys; open('out.txt', 'w')"
                                   ".write(sys.executable)\"\n    outs: [out.txt]\n")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    run_stage(root, "probe", log=lambda line: None)
    assert Path((root / "out.txt").read_text()).parent == Path(sys.executable).parent


def failing_probe_repo(root: Path) -> Path:
    """A stage with a cached folder and a git-tracked metric; param fail: 1 makes it fail (exit 3)
    after DVC deleted its outputs, sleep: N makes it take N seconds."""
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "probe.py").write_text(
        "import json, sys, time, yaml\n"
        "p = yaml.safe_load(open('params.yaml'))['probe']\n"
        "time.sleep(p['sleep'])\n"
        "if p['fail']:\n    print('error: probe refused', file=sys.stderr); sys.exit(3)\n"
        "import pathlib; pathlib.Path('out').mkdir(); pathlib.Path('out/model.bin').write_text(str(p['x']))\n"
        "json.dump({'x': p['x']}, open('metrics.json', 'w'))\n")
    (root / "dvc.yaml").write_text(f"stages:\n  probe:\n    cmd: {sys.executable} probe.py\n    deps: [probe.py]\n"
                                   "    params: [probe]\n    outs: [out]\n    metrics:\n"
                                   "      - metrics.json:\n          cache: false\n")
    (root / "params.yaml").write_text("probe:\n  x: 1\n  fail: 0\n  sleep: 0\n")
    return root


@pytest.mark.parametrize("how", ["fails", "times out"])
def test_a_failed_stage_puts_its_previous_outputs_back(tmp_path, how):
    """DVC deletes a stage's outputs before running it: a failed run left no model, no metrics."""
    from pipelines.dvcrepo import run_stage

    repo = failing_probe_repo(tmp_path / "repo")
    run_stage(repo, "probe", log=lambda line: None)
    lock = (repo / "dvc.lock").read_text()
    (repo / "params.yaml").write_text("probe:\n  x: 2\n  fail: 1\n  sleep: 0\n" if how == "fails" else
                                      "probe:\n  x: 2\n  fail: 0\n  sleep: 60\n")
    lines: list[str] = []
    with pytest.raises(StageFailed) as failed:
        run_stage(repo, "probe", log=lines.append, timeout_s=None if how == "fails" else 5)
    assert str(failed.value).endswith("; its previous outputs were put back"), failed.value
    assert failed.value.exit_code == (3 if how == "fails" else 1)
    assert (repo / "out/model.bin").read_text() == "1" and json.loads((repo / "metrics.json").read_text()) == {"x": 1}
    assert (repo / "dvc.lock").read_text() == lock
    _, reasons = inspect_repo(repo)
    assert all(reason.startswith("param") or "modified" in reason for reason in reasons["probe"]), reasons
    assert not any("outs" in reason for reason in reasons["probe"]), reasons
    assert not (repo / ".dvc/tmp/cifar10-previous-outputs/probe").exists()


def test_a_graph_up_to_a_stage_keeps_it_and_what_it_depends_on_in_dags_order():
    assert GRAPH.up_to("e").order == ["a", "b", "c", "e"] and GRAPH.up_to("b").upstream == {"a": [], "b": ["a"]}
    assert GRAPH.up_to("d").order == ["d"]
    with pytest.raises(ConfigError, match=r"^there is no stage 'x' in dvc.yaml; stages: a, b, c, d, e$"):
        GRAPH.up_to("x")

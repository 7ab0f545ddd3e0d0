import contextlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from pipelines import sweep as sweep_module
from pipelines.registry import stale_stages
from pipelines.runs import experiments_table
from pipelines.study import check_search, open_study, optuna_distributions, sample_points, search_of
from pipelines.sweep import LOOK_MAX_S, WIPE, LiveLine, Progress, _override
from stages.common import run_params as presets
from stages.common.errors import CommandFailed, ConfigError
from stages.common.params import read_params, read_sweep_file, whole_lists
from stages.common.paths import evaluation_files
from stages.common.trial import PRUNED_AT, pruner_of
from tests.helpers import (
    BIN,
    ENV,
    REPO,
    cli,
    cli_on_terminal,
    commit_experiment,
    copy_repo,
    dvc,
    git_dvc_project,
    not_blank,
    scored_project,
    set_params,
    tiny_params,
    visit,
)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, tiny_archive) -> Path:
    """The tiny project, run and committed once; each test sweeps a copy of it."""
    repo = git_dvc_project(tmp_path_factory.mktemp("sweep") / "project")
    set_params(repo / "params.yaml", **tiny_params(tiny_archive))
    dvc(repo, "repro")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline run"], cwd=repo, check=True)
    return repo


def test_grid_and_random_points():
    grid = sample_points({"train.optimizer": ["adam", "sgd"], "train.batch_size": {"choice": [8, 16]}}, "grid", 0, 0)
    assert len(grid) == 4 and {"train.optimizer": "sgd", "train.batch_size": 16} in grid
    space = {"train.learning_rate": {"log_uniform": [1e-4, 1e-3]}, "train.epochs": {"int_uniform": [1, 3]}}
    points = sample_points(space, "random", 50, seed=2)
    assert points == sample_points(space, "random", 50, seed=2)
    assert all(1e-4 <= p["train.learning_rate"] <= 1e-3 and p["train.epochs"] in (1, 2, 3) for p in points)
    with pytest.raises(ConfigError, match="unknown search space kind 'normal'"):
        sample_points({"x": {"normal": [0, 1]}}, "random", 1, 0)
    assert _override("train.learning_rate", 0.000123456789) == "train.learning_rate=0.000123457"
    assert _override("train.optimizer", "sgd") == 'train.optimizer="sgd"'  # JSON, which dvc -S reads as YAML
    assert _override("train.augment", {"flip": True}) == 'train.augment={"flip": true}'


def test_seed002s_search_draws_points_its_preset_builds(tmp_path):
    """sweeps/seed002.yaml on the seed's preset: every point passes the schemas and builds its model."""
    params_file = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params_file)
    presets.apply(params_file, "seed002")
    config = read_sweep_file(REPO / "sweeps" / "seed002.yaml")
    drawn = sample_points(config["space"], config["kind"], config["n"], config["seed"])
    points = [whole_lists(point, read_params(params_file)) for point in drawn]
    widths = [point["train.arch.bn_cnn.widths"] for point in points]
    assert len(points) == 10 and len({tuple(w) for w in widths}) > 1
    assert all(w[0] in (32, 48, 64) and w[1] in (64, 96, 128) and w[2] in (64, 96, 128) for w in widths)
    assert all(point["train.epochs"] == 5 and point["train.batch_size"] == 32 for point in points)
    for point in points[:3]:  # building a model takes a second or two
        presets.check_overrides(params_file, point)


def test_the_hyperband_file_is_keras_tuners_settings_on_seed002s_space():
    hyperband = read_sweep_file(REPO / "sweeps" / "seed002-hyperband.yaml")
    random = read_sweep_file(REPO / "sweeps" / "seed002.yaml")
    pruner = pruner_of(hyperband["pruner"])
    assert isinstance(pruner, optuna.pruners.HyperbandPruner)
    assert (pruner._min_resource, pruner._max_resource, pruner._reduction_factor) == (1, 10, 3)
    assert hyperband["n"] == 22 and hyperband["space"]["train.epochs"] == [10]  # 12 + 6 + 4 models, max_epochs 10
    assert all(hyperband["space"][key] == values for key, values in random["space"].items() if key != "train.epochs")


@pytest.mark.parametrize(("spec", "message"), [
    ("asha", "pruner 'asha' is not one of median, successive_halving, hyperband"),
    ({"median": {"patience": 2}}, "pruner median: MedianPruner.__init__() got an unexpected keyword argument 'patience'"),
    ({"median": {"n_startup_trials": -1}}, "pruner median: Number of startup trials cannot be negative"),
])
def test_a_pruner_optuna_lacks_is_one_line_before_anything_runs(tmp_path, spec, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        pruner_of(spec)
    repo = scored_project(tmp_path / "project")
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"kind": "random", "n": 2, "pruner": spec, "space": {"train.epochs": [1, 2]}}))
    env = {key: value for key, value in ENV.items() if key != "PREFECT_API_URL"}
    result = cli(env, "sweep", str(space), "--name", "s", "--repo", str(repo))
    assert result.returncode == 2 and result.stderr.startswith(f"error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1 and not (repo / "comparisons" / "s.journal").exists()


@pytest.mark.e2e
def test_a_sweep_ranks_its_points_and_fails_when_one_fails(tmp_path, baseline, prefect_env):
    repo = copy_repo(baseline, tmp_path / "project")
    # Seed 0 draws require_gpu true for t-3: it passes the schema and fails when it runs (no GPU).
    (tmp_path / "space.yaml").write_text(
        "kind: random\nn: 3\nseed: 0\nspace:\n  train.learning_rate: {log_uniform: [0.0005, 0.005]}\n"
        "  train.optimizer: {choice: [adam, sgd]}\n  train.require_gpu: {choice: [false, true]}\n"
    )
    result = cli(prefect_env, "sweep", str(tmp_path / "space.yaml"), "--name", "t", "--repo", str(repo))
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == "error: 1 of 3 points failed: t-3"
    shown = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=repo, capture_output=True, text=True).stdout
    assert all(f'"t-{i}"' in shown for i in (1, 2))
    table = pd.read_csv(repo / "comparisons" / "t.csv")
    assert sorted(table["name"]) == ["t-1", "t-2", "t-3"]
    assert dict(zip(table["name"], table["status"])) == {"t-1": "ok", "t-2": "ok", "t-3": "failed"}
    assert bool(table.loc[table["name"] == "t-3", "train.require_gpu"].item())
    ranked = table[table["status"] == "ok"]
    assert ranked["accuracy"].is_monotonic_decreasing and table["status"].iloc[-1] == "failed"  # best first
    assert "Best: `" in result.stdout
    # Progress as points end, one line each (Prefect's log), the last one with the whole count.
    progress = [line for line in (result.stdout + result.stderr).splitlines() if "progress: " in line]
    assert len(progress) >= 2 and "progress: 3/3 ended, 1 failed, 0 remaining; best so far t-" in progress[-1]

    promoted = cli(prefect_env, "promote", table["name"][0], "--branch", "best", "--stage", "prod", "--repo", str(repo))
    assert promoted.returncode == 0, promoted.stderr
    assert "registered cifar10-classifier v0.0.1 at " in promoted.stdout and "stage 'prod'" in promoted.stdout
    # A point runs up to evaluate; promoting it runs export and report for it on its branch, committed there.
    def at(rev: str, path: str) -> str:
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=repo, capture_output=True, text=True, check=True).stdout

    assert stale_stages(at("best~1", "dvc.yaml"), at("best~1", "dvc.lock")) == ["export", "report"]
    assert stale_stages(at("best", "dvc.yaml"), at("best", "dvc.lock")) == []
    assert "ran export, report for it on best" in promoted.stdout
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True).stdout == ""
    missing = cli(prefect_env, "promote", "t-9", "--repo", str(repo))  # exited 1 with DVC's own error
    assert missing.returncode == 2 and missing.stderr.startswith("error: no experiment named 't-9' in "), missing.stderr
    branches = subprocess.run(["git", "branch", "--list", "best"], cwd=repo, capture_output=True, text=True).stdout
    assert "best" in branches


@pytest.mark.e2e
def test_a_pruned_point_stops_early_is_kept_as_an_experiment_and_is_never_ranked(tmp_path, baseline, prefect_env):
    """The first point trains; the next two cannot learn (learning rate 1e-9), so at epoch 1 they
    fall below it and successive halving prunes them. It judges a point against every point that
    reached the same epoch, running or finished: the median rule would wait for the sweep to tell
    the first one finished, which the next may outrun (CI saw a point pruned only at its last epoch)."""
    repo = copy_repo(baseline, tmp_path / "project")
    space = tmp_path / "space.yaml"
    space.write_text("kind: grid\npruner: {successive_halving: {min_resource: 1, reduction_factor: 3}}\nspace:\n"
                     "  train.learning_rate: [0.01, 1.0e-9, 2.0e-9]\n  train.optimizer: [adam]\n"
                     "  train.schedule: [constant]\n  train.epochs: [3]\n")
    result = cli(prefect_env, "sweep", str(space), "--name", "p", "--repo", str(repo))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(repo / "comparisons" / "p.csv")
    # The pruned come after the finished, and their models are not evaluated: no test figures.
    assert list(table["status"]) == ["ok", "pruned", "pruned"] and set(table["name"][1:]) == {"p-2", "p-3"}, table
    assert (table.loc[1:, PRUNED_AT] == 1).all() and table["accuracy"].isna().tolist() == [False, True, True]
    assert "progress: 3/3 ended (2 pruned), 0 failed, 0 remaining; best so far p-1" in result.stdout + result.stderr
    assert "Best: `p-1`" in result.stdout
    shown = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    runs = {exp["name"]: exp for baseline in shown for exp in baseline.get("experiments") or []}
    pruned = runs["p-2"]["revs"][0]["data"]["metrics"]
    assert pruned["results/train/metrics.json"]["data"][PRUNED_AT] == 1  # kept, with where it stopped
    assert pruned["results/evaluate/metrics.json"]["data"] == {PRUNED_AT: 1, "split": "test"}
    listed = experiments_table(repo).set_index("name")["status"]
    assert listed[["p-1", "p-2", "p-3"]].tolist() == ["ok", "pruned", "pruned"], listed
    trials = {t.user_attrs["experiment"]: t for t in study_trials(repo, "p")}
    assert trials["p-2"].state == optuna.trial.TrialState.PRUNED and trials["p-1"].state.name == "COMPLETE"
    assert len(trials["p-1"].intermediate_values) == 3 and len(trials["p-2"].intermediate_values) == 1

    # The page, offline in Chromium: the ranked table, the curves (the pruned cut short), the parallel coordinates.
    page = visit((repo / "comparisons" / "p.html").as_uri(), tmp_path / "browser", settle_s=0.5, script=[
        "[...document.querySelectorAll('#ranked tr')].slice(1).map(r => r.className)",
        "[...document.querySelectorAll('#curves .curve')].map(c => [c.classList[1], c.points.numberOfItems])",
        "document.querySelectorAll('#parallel .point').length"])
    assert page.values[0] == ["ok", "pruned", "pruned"] and page.values[2] == 3, page.values
    assert sorted(page.values[1]) == sorted([["best", 3], *(["pruned", int(e)] for e in table.loc[1:, PRUNED_AT])])
    assert not_blank(page.screenshot) and page.external() == [] and "Parameter importances" in page.text

    again = cli(prefect_env, "sweep", str(space), "--name", "p", "--repo", str(repo))  # ended: nothing runs
    assert again.returncode == 0 and pd.read_csv(repo / "comparisons" / "p.csv").equals(table), again.stderr[-2000:]

    # A pruned point's model is a partial run: never promoted. The finished one is promoted without
    # its sweep's trial (the study is not committed: training after a later change would look for it).
    refused = cli(prefect_env, "promote", "p-2", "--repo", str(repo))
    assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
    assert "p-2 was pruned after epoch" in refused.stderr and "promote a finished point" in refused.stderr
    promoted = cli(prefect_env, "promote", "p-1", "--branch", "p-1", "--repo", str(repo))
    assert promoted.returncode == 0 and "train.trial" not in promoted.stderr, promoted.stderr[-2000:]
    on_branch = yaml.safe_load(subprocess.run(["git", "show", "p-1:params.yaml"], cwd=repo, capture_output=True,
                                              text=True, check=True).stdout)
    assert on_branch["train"]["trial"] is None and on_branch["train"]["learning_rate"] == 0.01
    subprocess.run(["git", "checkout", "-q", "p-1"], cwd=repo, check=True)
    dvc(repo, "checkout")
    assert dvc(repo, "status").stdout.strip() == "Data and pipelines are up to date."


def test_tpe_space_maps_to_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from pipelines.study import optuna_distributions

    dists = optuna_distributions({"a": [1, 2], "b": {"choice": ["x"]}, "c": {"uniform": [0, 1]},
                                  "d": {"log_uniform": [1e-4, 1e-2]}, "e": {"int_uniform": [1, 3]}})
    assert dists["a"] == CategoricalDistribution([1, 2]) and dists["b"] == CategoricalDistribution(["x"])
    assert dists["c"] == FloatDistribution(0, 1) and dists["d"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert dists["e"] == IntDistribution(1, 3)
    with pytest.raises(ConfigError, match="unknown search space kind 'normal'"):
        optuna_distributions({"x": {"normal": [0, 1]}})


@pytest.mark.e2e
def test_a_tpe_search_runs_each_trial_as_an_experiment(tmp_path, baseline, prefect_env):
    repo = copy_repo(baseline, tmp_path / "project")
    (tmp_path / "space.yaml").write_text("kind: tpe\nn: 2\nseed: 1\nspace:\n"
                                         "  train.learning_rate: {log_uniform: [0.0005, 0.005]}\n")
    result = cli(prefect_env, "sweep", str(tmp_path / "space.yaml"), "--name", "b", "--repo", str(repo))
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(repo / "comparisons" / "b.csv")
    assert sorted(table["name"]) == ["b-1", "b-2"] and set(table["status"]) == {"ok"}
    assert table["train.learning_rate"].between(0.0005, 0.005).all() and table["accuracy"].notna().all()
    shown = subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=repo, capture_output=True, text=True).stdout
    assert '"b-1"' in shown and '"b-2"' in shown
    assert "progress: 2/2 ended, 0 failed, 0 remaining; best so far b-" in result.stdout + result.stderr


def slow_scored_project(root: Path, seconds: float, per_epoch: float = 0) -> Path:
    """The scoring project, each point taking `seconds` and `per_epoch` for each of its train.epochs,
    its baseline committed."""
    repo = scored_project(root)
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")  # comparisons/, where the study lives, is ignored
    sleep = ("import time, yaml\n"
             f"time.sleep({seconds} + {per_epoch} * yaml.safe_load(open('params.yaml'))['train']['epochs'])\n")
    (repo / "scorer.py").write_text(sleep + (repo / "scorer.py").read_text())
    set_params(repo / "params.yaml", train={"epochs": 2})
    dvc(repo, "repro", "-q")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "baseline run"], cwd=repo, check=True)
    return repo


def study_trials(repo: Path, name: str) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = repo / "comparisons" / f"{name}.journal"
    if not journal.exists():
        return []
    try:
        return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(journal)))).trials
    except KeyError:  # the sweep has not created its study yet
        return []


def first_tpe_points(space: dict, seed: int, count: int) -> list[dict]:
    """What a TPE sweep's sampler asks first, `count` trials in flight together."""
    study = open_study(optuna.storages.InMemoryStorage(), "probe", search_of("tpe", space, seed, 0), [])
    return [study.ask(optuna_distributions(space)).params for _ in range(count)]


@pytest.mark.e2e
def test_a_tpe_search_asks_the_next_point_as_soon_as_one_ends(tmp_path, prefect_env):
    space = {"train.epochs": {"choice": [1, 8]}}  # a point sleeps 3 s per epoch: a quick one and a slow one
    seed = next(s for s in range(50) if len({p["train.epochs"] for p in first_tpe_points(space, s, 2)}) == 2)
    repo = slow_scored_project(tmp_path / "project", seconds=0, per_epoch=3)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"kind": "tpe", "n": 3, "seed": seed, "space": space}))
    code, terminal = cli_on_terminal(prefect_env, "sweep", str(tmp_path / "space.yaml"), "--name", "a", "-j", "2",
                                     "--repo", str(repo))
    assert code == 0, terminal[-3000:]
    # The live line, rewritten in place while points run, wiped before each log line.
    live = [shown for shown in terminal.split(WIPE) if re.match(r"progress: .*running, \d+ waiting; \d+:\d\d; ", shown)]
    assert live and live[0].startswith("progress: 0/3 ended, 0 failed; "), live
    assert any(shown.startswith("progress: 1/3 ended") for shown in live), live
    running = [int(re.search(r"; (\d+) running, ", shown)[1]) for shown in live]
    assert max(running) <= 2 and sum(running) > 0, f"-j 2 runs up to two points at once: {live}"
    assert max(map(len, live)) < 80, "the live line is wider than the terminal's 80 columns"
    assert not [shown for shown in live if "\n" in shown], "a log line shares the live line"
    assert "Best: `" in terminal, terminal[-2000:]
    first, second, third = sorted(study_trials(repo, "a"), key=lambda t: t.number)
    assert {t.state for t in (first, second, third)} == {optuna.trial.TrialState.COMPLETE}
    quick, slow = sorted((first, second), key=lambda t: t.params["train.epochs"])
    # Asked when the quick point ended, while the slow one still ran: never a batch waiting for its slowest.
    assert quick.datetime_complete <= third.datetime_start < slow.datetime_complete, (quick, slow, third)
    assert set(pd.read_csv(repo / "comparisons" / "a.csv")["status"]) == {"ok"}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_live_line_is_rewritten_in_place_on_a_terminal_and_wiped_before_a_log_line(monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    monkeypatch.setenv("TERM", "xterm")
    terminal = Terminal()
    handler = logging.StreamHandler(terminal)
    logger = logging.getLogger("test-live-line")
    logger.addHandler(handler)
    try:
        with LiveLine(terminal, [handler]) as live:
            live.show("x" * 100)  # as wide as the terminal, less one: a wrapped line would not be wiped
            live.show("progress: 1/4")
            logger.warning("a point ended")
            live.show("progress: 2/4")
        logger.warning("after the sweep")
    finally:
        logger.removeHandler(handler)
    assert terminal.getvalue() == (f"{WIPE}{'x' * 39}{WIPE}progress: 1/4{WIPE}a point ended\n{WIPE}progress: 2/4{WIPE}"
                                   "after the sweep\n")


def test_no_live_line_off_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setenv("TERM", "xterm")
    plain = io.StringIO()
    LiveLine(plain, []).show("progress")
    monkeypatch.setenv("TERM", "dumb")
    dumb = Terminal()
    LiveLine(dumb, []).show("progress")
    assert plain.getvalue() == dumb.getvalue() == ""


def test_the_live_line_counts_points_ended_running_and_waiting_and_the_time_taken(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    terminal = Terminal()
    progress = Progress(tmp_path, 4, "accuracy", logging.getLogger("test-live-line"), LiveLine(terminal, []))
    progress.metric, progress.failed, progress.started = {"s-1": 0.5}, ["s-2"], time.monotonic() - 75
    progress.poll(running=1, waiting=1)
    assert terminal.getvalue() == (f"{WIPE}progress: 2/4 ended, 1 failed; 1 running, 1 waiting; 1:15; "
                                   "best so far s-1 (accuracy 0.5)")


def fake_queue(tmp_path: Path, answers: list[tuple[int, str]], monkeypatch) -> Path:
    """A `dvc` that answers `dvc queue status` as DVC does, one canned answer per call (the last
    one again when they run out); the number of calls in `asked`."""
    for number, (code, said) in enumerate(answers):
        (tmp_path / f"answer-{number}").write_text(said + "\n")
        (tmp_path / f"code-{number}").write_text(str(code))
    (tmp_path / "asked").write_text("0")
    last = len(answers) - 1
    fake = tmp_path / "dvc"
    fake.write_text(f"#!/bin/sh\nn=$(cat {tmp_path}/asked); echo $((n + 1)) > {tmp_path}/asked\n"
                    f"[ $n -gt {last} ] && n={last}\n"
                    f"cat {tmp_path}/answer-$n; [ $(cat {tmp_path}/code-$n) = 0 ] || echo 'ERROR: lock' >&2\n"
                    f"exit $(cat {tmp_path}/code-$n)\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sweep_module, "dvc_executable", lambda: str(fake))
    return tmp_path / "asked"


def fake_clock(monkeypatch) -> list[float]:
    """time.monotonic as a list's one value, moved on by time.sleep, which returns at once."""
    now = [0.0]
    monkeypatch.setattr(sweep_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(sweep_module.time, "sleep", lambda seconds: now.__setitem__(0, now[0] + seconds))
    return now


QUEUE_HEADER, NO_WORKERS = "Task     Name    Created    Status", "Worker status: 0 active, 0 idle"
ONE_WORKER = "Worker status: 1 active, 0 idle"


def test_a_queue_status_that_cannot_be_read_is_looked_at_again_never_taken_for_every_point_ended(tmp_path, monkeypatch):
    # `dvc queue status` fails now and then while DVC's queue saves a point (its lock): a sweep that
    # read that as an empty queue took every point in flight for ended, and their results as failed.
    asked = fake_queue(tmp_path, [
        (0, f"{QUEUE_HEADER}\n{NO_WORKERS}"),  # no other sweep's worker to stop first
        (255, ""), (0, f"{QUEUE_HEADER}\n1a2b3c   q-1     10:01 AM   Running\n4d5e6f   q-2     10:01 AM   Queued\n{ONE_WORKER}"),
        (255, ""), (0, f"{QUEUE_HEADER}\n1a2b3c   q-1     10:01 AM   Success\n4d5e6f   q-2     10:01 AM   Running\n{ONE_WORKER}")],
        monkeypatch)
    fake_clock(monkeypatch)
    seen: list[tuple[int, int]] = []
    queue = sweep_module.LocalQueue(tmp_path, 2, logging.getLogger("test-queue"))
    queue.pending, queue.on_poll = {"q-1", "q-2"}, lambda running, waiting: seen.append((running, waiting))
    assert queue.wait() == {"q-1"}
    assert queue.pending == {"q-2"} and seen == [(1, 1), (1, 1), (1, 0)] and asked.read_text().strip() == "5"


def test_the_queue_is_asked_at_once_when_a_point_commits_its_experiment_and_not_for_one_from_before(tmp_path,
                                                                                                   monkeypatch):
    repo = git_dvc_project(tmp_path / "project")
    running = f"{QUEUE_HEADER}\n1a2b3c   q-1     10:01 AM   Running\n4d5e6f   q-2     10:01 AM   Queued\n{ONE_WORKER}"
    fake_queue(tmp_path, [(0, f"{QUEUE_HEADER}\n{NO_WORKERS}"), (0, running)], monkeypatch)
    now = fake_clock(monkeypatch)
    queue = sweep_module.LocalQueue(repo, 1, logging.getLogger("test-queue"))
    commit_experiment(repo, "q-2", {"notes.txt": "an earlier sweep's q-2"})
    queue.pending, queue.before = {"q-1", "q-2"}, sweep_module.experiment_commits(repo)  # as submit finds them
    looks: list[float] = []
    real_look, real_sleep = sweep_module.queue_state, sweep_module.time.sleep

    def sleep(seconds: float) -> None:
        real_sleep(seconds)
        if now[0] == 100:  # q-1 ends: its experiment is saved, then the queue lets go of it
            commit_experiment(repo, "q-1", {"notes.txt": "q-1 ended"})
            (tmp_path / "answer-1").write_text(running.replace("Running", "Success", 1) + "\n")

    monkeypatch.setattr(sweep_module.time, "sleep", sleep)
    monkeypatch.setattr(sweep_module, "queue_state", lambda repo: looks.append(now[0]) or real_look(repo))
    assert queue.wait() == {"q-1"} and queue.pending == {"q-2"}
    # Looked at on its own schedule (0, 5, ... 75, 95; next at 120) until q-1's experiment showed.
    assert looks[-3:] == [75, 95, 100]


@pytest.mark.e2e
def test_a_point_dvcs_queue_dropped_unrun_is_queued_again_not_waited_for_forever(tmp_path, monkeypatch):
    """DVC's idle worker stops for an empty queue after a few seconds; one that takes a point just
    as it stops never runs it, and `dvc queue status` calls the point running for good. A TPE sweep
    of one job, which queues the next point the moment the last ends, waited for it until killed."""
    repo = slow_scored_project(tmp_path / "project", 0)
    monkeypatch.setattr(sweep_module, "UNSERVED_S", 6.0)
    queue = sweep_module.LocalQueue(repo, 1, logging.getLogger("test-queue"))
    queue.sets["u-1"], queue.pending, queue.before = ["-S", "train.epochs=1"], {"u-1"}, {"u-1": None}
    queue._queue("u-1")
    # The state that race leaves: the point's message taken from the queue, no worker, no run.
    broker = repo / ".dvc" / "tmp" / "exps" / "celery" / "broker"
    (message,) = (broker / "in").glob("*.celery.msg")
    (broker / "processed").mkdir(exist_ok=True)
    message.rename(broker / "processed" / message.name)
    assert sweep_module.queue_statuses(repo) == {"u-1": "Running"}
    started = time.monotonic()
    assert queue.wait() == {"u-1"} and time.monotonic() - started < 120
    assert sweep_module.queue_statuses(repo) == {"u-1": "Success"} and "u-1" in sweep_module.experiment_commits(repo)


def test_the_queue_is_asked_less_often_the_longer_a_point_runs_and_at_least_twice_a_minute(tmp_path, monkeypatch):
    # `dvc queue status` costs about a second of CPU: asked every 5 s, it took a sixth of a core
    # beside the training all along.
    running = f"{QUEUE_HEADER}\n1a2b3c   q-1     10:01 AM   Running\n{ONE_WORKER}"
    fake_queue(tmp_path, [(0, f"{QUEUE_HEADER}\n{NO_WORKERS}"), *[(0, running)] * 24,
                          (0, running.replace("Running", "Failed"))], monkeypatch)
    now = fake_clock(monkeypatch)
    queue = sweep_module.LocalQueue(tmp_path, 1, logging.getLogger("test-queue"))
    looks: list[float] = []
    real = sweep_module.queue_state
    monkeypatch.setattr(sweep_module, "queue_state", lambda repo: looks.append(now[0]) or real(repo))
    queue.pending = {"q-1"}
    assert queue.wait() == {"q-1"}  # its failure seen at the 25th look
    gaps = [later - earlier for earlier, later in itertools.pairwise(looks)]
    assert len(looks) == 25 and gaps[:5] == [5.0] * 5 and gaps == sorted(gaps) and max(gaps) == LOOK_MAX_S
    assert looks[-1] > 8 * 60  # every 5 s, 25 looks would have been two minutes


def test_results_unreadable_while_the_queue_sets_up_a_point_are_read_again_for_about_a_minute(tmp_path, monkeypatch):
    # `dvc exp show` fails while DVC's queue sets up a point's workspace (its infofile not written
    # yet), for longer on a busy machine: a sweep that gave up after a few seconds crashed there.
    infofile_missing = CommandFailed("dvc exp show --json: unexpected error - [Errno 2] No such file or directory: "
                                     "'.dvc/tmp/exps/run/28a4/28a4.run'")
    answers = [infofile_missing] * 4 + [pd.DataFrame([{"name": "s-1", "status": "ok", "accuracy": 0.5}])]
    waited: list[float] = []

    def exp_show(repo, sort_by):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(sweep_module, "experiments_table", exp_show)
    monkeypatch.setattr(sweep_module.time, "sleep", waited.append)
    progress = Progress(tmp_path, 2, "accuracy", logging.getLogger("test-results"))
    assert progress.results()["accuracy"].tolist() == [0.5] and waited == [2, 4, 8, 16]
    answers[:] = [infofile_missing] * 6
    with pytest.raises(CommandFailed, match="No such file or directory"):
        progress.results()
    assert waited[4:] == [2, 4, 8, 16, 30] and not answers  # bounded: six looks over a minute, then the error


def test_an_ended_points_metric_is_its_own_experiments_and_one_without_a_finite_metric_failed(tmp_path):
    repo = git_dvc_project(tmp_path / "project")
    metrics = evaluation_files(repo)["metrics"]
    commit_experiment(repo, "s-1", {metrics: json.dumps({"accuracy": 0.5})})
    commit_experiment(repo, "s-2", {metrics: json.dumps({"accuracy": float("nan")})})  # how json writes a nan
    commit_experiment(repo, "s-4", {metrics: json.dumps({"accuracy": 0.7})})
    progress = Progress(repo, 4, "accuracy", logging.getLogger("test-ended"))
    progress.ended({"s-1", "s-2", "s-3"})  # s-3 has no experiment: it failed
    assert progress.metric == {"s-1": 0.5} and progress.failed == ["s-2", "s-3"]


@pytest.mark.e2e
def test_a_sweep_killed_half_way_resumes_and_keeps_what_ended(tmp_path, prefect_env):
    repo = slow_scored_project(tmp_path / "project", seconds=3)
    space = tmp_path / "space.yaml"
    space.write_text("kind: random\nn: 4\nseed: 1\nspace:\n  train.epochs: {int_uniform: [1, 8]}\n")
    command = [str(BIN / "cifar10-pipeline"), "sweep", str(space), "--name", "r", "--repo", str(repo)]
    log = tmp_path / "first.log"
    with log.open("w") as out:
        first = subprocess.Popen(command, env=prefect_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while sum(t.state == optuna.trial.TrialState.COMPLETE for t in study_trials(repo, "r")) < 2:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
    finally:
        with contextlib.suppress(ProcessLookupError):  # it ended by itself
            os.killpg(first.pid, signal.SIGKILL)  # the terminal's process group: the sweep dies at once
        first.wait()
    before = {t.user_attrs["experiment"]: t.value for t in study_trials(repo, "r")
              if t.state == optuna.trial.TrialState.COMPLETE}

    resumed = cli(prefect_env, "sweep", str(space), "--name", "r", "--repo", str(repo))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming sweep r: " in resumed.stdout + resumed.stderr
    table = pd.read_csv(repo / "comparisons" / "r.csv")
    assert len(table) == 4 and set(table["status"]) == {"ok"}, table  # as many as a sweep never killed
    kept = dict(zip(table["name"], table["accuracy"]))
    assert all(kept[exp] == value for exp, value in before.items()), (before, kept)  # not run again
    drawn = {point["train.epochs"] for point in sample_points({"train.epochs": {"int_uniform": [1, 8]}}, "random", 4, 1)}
    assert set(table["train.epochs"]) <= drawn  # the sweep's own points, a retry asking the same
    shown = subprocess.run([str(BIN / "dvc"), "queue", "status"], cwd=repo, capture_output=True, text=True).stdout
    assert "Queued" not in shown and "Running" not in shown, shown

    again = cli(prefect_env, "sweep", str(space), "--name", "r", "--repo", str(repo))  # ended: nothing runs
    assert again.returncode == 0 and pd.read_csv(repo / "comparisons" / "r.csv").equals(table), again.stderr[-2000:]
    space.write_text("kind: random\nn: 4\nseed: 2\nspace:\n  train.epochs: {int_uniform: [1, 8]}\n")
    other = cli(prefect_env, "sweep", str(space), "--name", "r", "--repo", str(repo))
    assert other.returncode == 2 and other.stderr == (
        "error: sweep 'r' was started with another search (its seed differs); rerun that search to resume it, "
        "or give this one another --name\n"), other.stderr[-2000:]


def test_a_study_keeps_its_search_in_the_storage_it_is_given(tmp_path):
    url = f"sqlite:///{tmp_path / 'team.db'}"
    search = search_of("random", {"train.epochs": [1, 2]}, 3, 2)
    study = open_study(url, "s", search, [{"train.epochs": 1}, {"train.epochs": 2}])
    waiting = study.get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs["point"] for t in waiting] == [{"train.epochs": 1}, {"train.epochs": 2}]
    assert open_study(url, "s", search, []).user_attrs["search"] == search  # loaded, not queued twice
    assert len(optuna.load_study(study_name="s", storage=url).trials) == 2
    with pytest.raises(ConfigError, match=r"^sweep 's' was started with another search \(its kind, n differ\)"):
        check_search(url, "s", search_of("grid", {"train.epochs": [1, 2]}, 3, 4))
    check_search(url, "t", search_of("grid", {}, 0, 1))  # a new name: a new sweep


@pytest.mark.parametrize(("url", "message"), [
    ("foo://x/y", "error: --storage foo://x/y: Can't load plugin: sqlalchemy.dialects:foo; give an Optuna storage URL"),
    ("sqlite:////no/such/folder/s.db", ("error: --storage sqlite:////no/such/folder/s.db: unable to open database file; "
                                       "its folder must exist and be writable")),
])
def test_a_storage_that_cannot_be_used_is_one_line_before_anything_runs(tmp_path, url, message):
    repo = scored_project(tmp_path / "project")
    space = tmp_path / "space.yaml"
    space.write_text("kind: random\nn: 2\nspace:\n  train.epochs: [1, 2]\n")
    env = {key: value for key, value in ENV.items() if key != "PREFECT_API_URL"}
    result = cli(env, "sweep", str(space), "--name", "s", "--storage", url, "--repo", str(repo))
    assert result.returncode == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


def test_the_stages_a_point_left_are_those_never_run_or_run_on_an_input_since_changed():
    declared = "stages:\n  train: {cmd: t}\n  evaluate: {cmd: e}\n  export: {cmd: x}\n  report: {cmd: r}\n"
    lock = ("stages:\n  train: {outs: [{path: m, md5: new}]}\n  evaluate: {deps: [{path: m, md5: new}]}\n"
            "  export: {deps: [{path: m, md5: old}]}\n")
    assert stale_stages(declared, lock) == ["export", "report"]  # report never ran; export ran on the old model
    assert stale_stages(declared, lock.replace("old", "new") + "  report: {deps: [{path: m, md5: new}]}\n") == []

"""Comparison statistics on fixed predictions, and compare/gate on real git + DVC repos."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipelines.gate import default_baseline, judge
from pipelines.runs import Run, check_comparable
from pipelines.statistics import bootstrap_interval, mcnemar, uncertainty, verdict
from stages.common.errors import ConfigError
from stages.common.paths import evaluation_files
from stages.common.schemas import GateParams
from tests.helpers import REPO, cli, dvc, git_dvc_project, not_blank, set_params, tiny_params, visit


def predictions(actual: list[int], predicted: list[int]) -> pd.DataFrame:
    return pd.DataFrame({"index": range(len(actual)), "actual": actual, "predicted": predicted, "probability": 0.5})


def test_mcnemar_matches_the_exact_binomial_by_hand():
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1], bool)
    b = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1, 1], bool)
    only_a, only_b, p = mcnemar(a, b)
    # discordant pairs: 1 where only A is right, 5 where only B is: p = 2 * P(X <= 1 | n=6, 1/2) = 2 * 7/64
    assert (only_a, only_b) == (1, 5) and p == pytest.approx(14 / 64)
    assert mcnemar(a, a)[2] == 1.0


def test_bootstrap_interval_brackets_the_estimate_like_the_normal_approximation():
    correct = np.array([1.0] * 700 + [0.0] * 300)
    low, high = bootstrap_interval(correct, n_boot=4000, seed=1)
    half = 1.96 * np.sqrt(0.7 * 0.3 / 1000)  # 0.0284
    assert low == pytest.approx(0.7 - half, abs=0.006) and high == pytest.approx(0.7 + half, abs=0.006)
    assert bootstrap_interval(np.ones(50)) == (1.0, 1.0)


def test_uncertainty_and_verdicts_on_fixed_predictions():
    actual = [i % 10 for i in range(1000)]
    a = predictions(actual, [y if i % 4 else (y + 1) % 10 for i, y in enumerate(actual)])   # 75% right
    b = predictions(actual, [y if i % 10 else (y + 1) % 10 for i, y in enumerate(actual)])  # 90% right
    stats = uncertainty(a, b, "A", "B")
    assert stats.accuracy_a == 0.75 and stats.accuracy_b == 0.9 and stats.difference == pytest.approx(0.15)
    # A is wrong on i%4==0 (250 images), B on i%10==0 (100); both on i%20==0 (50)
    assert (stats.only_a, stats.only_b) == (50, 200) and stats.p_value < 1e-15
    assert stats.verdict.startswith("B is better, p=")
    # paired differences: +1 x200, -1 x50, 0 x750 -> sd sqrt(0.25 - 0.15^2), half-width 1.96 * sd / sqrt(1000)
    half = 1.96 * np.sqrt((0.25 - 0.15**2) / 1000)
    assert stats.interval_difference == pytest.approx((0.15 - half, 0.15 + half), abs=0.006)
    assert verdict("A", "B", 0.01, 0.3) == "difference within noise (p=0.3)"
    assert verdict("A", "B", -0.02, 0.003) == "A is better, p=0.003"
    unpaired = uncertainty(a, b.iloc[:500], "A", "B")
    assert unpaired.p_value is None and unpaired.verdict == "no paired predictions: significance unknown"


def run(name: str, accuracy: float, recalls: dict[str, float], preds: pd.DataFrame | None = None) -> Run:
    report = {c: {"precision": r, "recall": r, "f1-score": r, "support": 10} for c, r in recalls.items()}
    return Run(name, None, {"accuracy": accuracy}, report, None, preds)


def test_gate_decisions():
    params = GateParams(max_accuracy_drop=0.01, max_recall_drop=0.05, require_significance=False)
    base = run("main", 0.80, {"cat": 0.7, "dog": 0.8})
    rose = judge(base, run("ws", 0.81, {"cat": 0.72, "dog": 0.8}), params)
    assert rose.passed  # and a rise reads as one (it was printed as "drop -0.0100")
    assert rose.lines[0] == "accuracy 0.8000 -> 0.8100 (+0.0100; a drop of more than 0.01 fails)"
    dropped = judge(base, run("ws", 0.78, {"cat": 0.60, "dog": 0.8}), params)
    assert not dropped.passed
    assert dropped.reasons == ["accuracy dropped by 0.0200 > 0.01 (gate.max_accuracy_drop)",
                               "recall of cat dropped by 0.1000 > 0.05 (gate.max_recall_drop)"]
    # With require_significance a drop that McNemar calls noise passes.
    actual = [i % 2 for i in range(100)]
    noisy_a = predictions(actual, [y if i != 0 else 1 - y for i, y in enumerate(actual)])
    noisy_b = predictions(actual, [y if i not in (0, 1, 2) else 1 - y for i, y in enumerate(actual)])
    lenient = GateParams(0.01, 0.05, require_significance=True)
    assert judge(run("main", 0.99, {"a": 1.0}, noisy_a), run("ws", 0.97, {"a": 1.0}, noisy_b), lenient).passed


def test_require_significance_tests_each_class_on_its_own_images():
    """A class that collapses while overall accuracy stays flat is a real regression."""
    classes = ["cat", "dog", "ship", "frog"]
    actual = [classes[i % 4] for i in range(400)]
    base_pred = [a if a in ("cat", "dog") or i % 8 < 4 else "dog" for i, a in enumerate(actual)]  # ship, frog: half
    # cat collapses (all wrong), ship and frog get right what they missed: the same total.
    cand_pred = ["dog" if a == "cat" else a if a != "dog" or i % 8 < 7 else "cat" for i, a in enumerate(actual)]
    base, cand = predictions(actual, base_pred), predictions(actual, cand_pred)

    def report(frame):
        return {c: {"recall": float((frame.loc[frame.actual == c, "predicted"] == c).mean())} for c in classes}

    accuracy = [float((f.actual == f.predicted).mean()) for f in (base, cand)]
    assert accuracy == [0.75, 0.75]
    lenient = GateParams(0.01, 0.05, require_significance=True)
    verdict_ = judge(Run("main", None, {"accuracy": accuracy[0]}, report(base), None, base),
                     Run("ws", None, {"accuracy": accuracy[1]}, report(cand), None, cand), lenient)
    assert not verdict_.passed
    assert verdict_.reasons[0].startswith("recall of cat dropped by 1.0000 > 0.05 (gate.max_recall_drop), McNemar")


def test_runs_on_different_splits_or_data_are_not_compared():
    test_run = Run("a", None, {"accuracy": 0.8, "split": "test", "data": "aa"}, {}, None, None)
    val_run = Run("b", None, {"accuracy": 0.9, "split": "val", "data": "bb"}, {}, None, None)
    with pytest.raises(ConfigError, match="a was evaluated on the test split and b on the val split"):
        check_comparable(test_run, val_run)
    other_data = Run("c", None, {"accuracy": 0.9, "split": "test", "data": "cc"}, {}, None, None)
    with pytest.raises(ConfigError, match="different images"):
        check_comparable(test_run, other_data)
    old = Run("old", None, {"accuracy": 0.7}, {}, None, None)
    assert check_comparable(old, test_run) == [("old does not record its evaluated split (evaluated before it "
                                               "was recorded)")]


def test_default_baseline_is_never_the_candidates_own_run(tmp_path):
    repo = tmp_path / "repo"
    (repo / "results/evaluate").mkdir(parents=True)
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")  # where metrics.json lives
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]

    def commit(message: str, accuracy: float | None = None) -> str:
        if accuracy is not None:
            (repo / "results/evaluate/metrics.json").write_text(json.dumps({"accuracy": accuracy}))
        (repo / "log.txt").write_text(message)
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-qm", message], cwd=repo, check=True)
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()

    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    first = commit("run 1", 0.5)
    second = commit("run 2", 0.6)
    commit("docs")  # newer than the last run, no metrics
    # On main with a clean workspace the candidate IS run 2: compare it with run 1, not itself.
    assert default_baseline(repo) == (first, "main")
    (repo / "results/evaluate/metrics.json").write_text(json.dumps({"accuracy": 0.7}))  # a new, uncommitted run
    assert default_baseline(repo) == (second, "main")
    subprocess.run(["git", "checkout", "-q", "-b", "feature"], cwd=repo, check=True)
    commit("run 3 on a branch", 0.7)
    assert default_baseline(repo) == (second, "main")  # where the branch left main
    # A CI checkout: a clone at the candidate, detached, with no local main, only origin/main.
    ci = tmp_path / "ci"
    subprocess.run(["git", "clone", "-q", str(repo), str(ci)], check=True)
    subprocess.run(["git", "checkout", "-q", "--detach", "origin/feature"], cwd=ci, check=True)
    assert subprocess.run(["git", "rev-parse", "--verify", "-q", "main"], cwd=ci).returncode != 0
    assert default_baseline(ci) == (second, "origin/main")
    # A fresh clone's own runs, committed on local main, none pushed: origin/main has none to offer.
    fresh = tmp_path / "fresh"
    subprocess.run(["git", "init", "-q", "-b", "main", str(fresh)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "empty"], cwd=fresh, check=True)
    subprocess.run(["git", "clone", "-q", str(fresh), str(repo.parent / "clone")], check=True)
    clone = repo.parent / "clone"
    shutil.copy(REPO / "dvc.yaml", clone / "dvc.yaml")
    (clone / "results/evaluate").mkdir(parents=True)
    repo = clone
    local_first = commit("run 1 in the clone", 0.5)
    commit("run 2 in the clone", 0.6)
    assert default_baseline(clone) == (local_first, "main")


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory, tiny_archive):
    """A repo with two committed runs that differ in train.epochs."""
    repo = git_dvc_project(tmp_path_factory.mktemp("compare") / "project")
    set_params(repo / "params.yaml", **tiny_params(tiny_archive))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    for epochs in (1, 3):
        set_params(repo / "params.yaml", train={"epochs": epochs})
        dvc(repo, "repro")
        subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
        subprocess.run([*git, "commit", "-qm", f"{epochs} epochs"], cwd=repo, check=True)
    return repo


@pytest.mark.e2e
def test_compare_two_commits_shows_param_and_metric_deltas(two_commits, prefect_env):
    repo = two_commits
    result = cli(prefect_env, "compare", "HEAD~1", "HEAD", "--repo", str(repo))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "| train.epochs | 1 | 3 |" in out
    old = json.loads(subprocess.run(["git", "show", "HEAD~1:results/evaluate/metrics.json"], cwd=repo,
                                    capture_output=True, text=True).stdout)
    new = json.loads((repo / "results/evaluate/metrics.json").read_text())
    assert f"| accuracy | {old['accuracy']} | {new['accuracy']} | {new['accuracy'] - old['accuracy']:+.4f} |" in out
    assert "McNemar (exact)" in out and "**Verdict: " in out and "| class | precision |" in out
    folder = repo / "comparisons" / "HEAD-1_vs_HEAD"
    for name in ("compare.md", "compare.html", "confusion.png", "confusion_difference.png", "curves.png",
                 "plots/index.html"):
        assert (folder / name).is_file(), name
    # Both pages draw in a browser with nothing fetched from outside the machine.
    plots = visit((folder / "plots/index.html").as_uri(), repo.parent / "browser-plots")
    assert plots.external() == [] and plots.failed == [] and plots.charts >= 3 and not_blank(plots.screenshot)
    page = visit((folder / "compare.html").as_uri(), repo.parent / "browser-compare", settle_s=1.0)
    assert page.external() == [] and page.images == (3, 3) and "Verdict:" in page.text and not_blank(page.screenshot)

    table = cli(prefect_env, "compare", "--all", "--csv", str(repo / "all.csv"), "--repo", str(repo))
    assert table.returncode == 0, table.stderr
    rows = pd.read_csv(repo / "all.csv", keep_default_na=False)
    # The two runs: the first commit has none, and the workspace holds HEAD's. Params: those unlike main's.
    old_sha = subprocess.run(["git", "rev-parse", "--short", "HEAD~1"], cwd=repo, capture_output=True, text=True)
    assert dict(zip(rows["name"], rows["params"])) == {"main": "", old_sha.stdout.strip(): "train.epochs=1"}
    assert rows["accuracy"].is_monotonic_decreasing and set(rows["status"]) == {"ok"}
    assert (repo / "comparisons/history.html").is_file()

    # --json: the same findings for scripts.
    findings = json.loads(cli(prefect_env, "compare", "HEAD~1", "HEAD", "--json", "--repo", str(repo)).stdout)
    assert findings["metrics"]["accuracy"] == {"a": old["accuracy"], "b": new["accuracy"],
                                               "change": pytest.approx(new["accuracy"] - old["accuracy"])}
    assert {"param": "train.epochs", "a": 1, "b": 3} in findings["params"]
    assert findings["uncertainty"]["verdict"] in out and findings["page"] == str(folder / "compare.html")
    all_runs = json.loads(cli(prefect_env, "compare", "--all", "--json", "--pages", "0", "--repo", str(repo)).stdout)["runs"]
    assert [r["metrics"]["accuracy"] for r in all_runs] == rows["accuracy"].tolist()
    status = json.loads(cli(prefect_env, "status", "--json", "--repo", str(repo)).stdout)
    assert {s["stage"]: s["status"] for s in status["stages"]}["train"] == "up to date"


@pytest.mark.e2e
def test_gate_fails_a_planted_regression_and_passes_an_improvement(two_commits, prefect_env):
    repo = two_commits
    evaluate = repo / "results/evaluate"
    saved = {p.name: p.read_text() for p in evaluate.iterdir()}
    try:
        preds = pd.read_csv(evaluate / "predictions.csv")
        right = preds["actual"] == preds["predicted"]
        victim = preds.loc[right, "actual"].mode()[0]  # the class with the most right answers
        other = next(c for c in preds["actual"].unique() if c != victim)
        worse = preds.copy()
        worse.loc[right & (preds["actual"] == victim), "predicted"] = other  # plant: its recall collapses
        worse.to_csv(evaluate / "predictions.csv", index=False)
        metrics = json.loads(saved["metrics.json"])
        metrics["accuracy"] = round(float((worse["actual"] == worse["predicted"]).mean()), 4)
        (evaluate / "metrics.json").write_text(json.dumps(metrics))
        report = json.loads(saved["classification_report.json"])
        report[victim]["recall"] = 0.0
        (evaluate / "classification_report.json").write_text(json.dumps(report))
        failed = cli(prefect_env, "gate", "--baseline", "HEAD", "--repo", str(repo))
        assert failed.returncode == 1, failed.stdout
        assert "Quality gate FAILED" in failed.stdout and f"recall of {victim} dropped by" in failed.stdout

        better = preds.copy()
        better["predicted"] = better["actual"]
        better.to_csv(evaluate / "predictions.csv", index=False)
        (evaluate / "metrics.json").write_text(json.dumps({**metrics, "accuracy": 1.0}))
        perfect = {c: ({**r, "recall": 1.0} if isinstance(r, dict) else r) for c, r in report.items()}
        (evaluate / "classification_report.json").write_text(json.dumps(perfect))
        passed = cli(prefect_env, "gate", "--baseline", "HEAD", "--repo", str(repo))
        assert passed.returncode == 0 and "Quality gate passed" in passed.stdout
    finally:
        for name, text in saved.items():
            (evaluate / name).write_text(text)


def gate_verdicts(prefect_api: str, repo) -> list[dict]:
    """The gate artifacts of the flow runs on `repo`, newest first: the server is shared with other
    tests' flows, which publish theirs under the same key meanwhile."""
    from tests.helpers import api

    runs = api(prefect_api, "POST", "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 200})
    mine = [run["id"] for run in runs if Path(run["parameters"].get("repo_dir", "")).resolve() == Path(repo).resolve()]
    return api(prefect_api, "POST", "/artifacts/filter", {"sort": "CREATED_DESC", "artifacts": {
        "key": {"any_": ["cifar10-gate"]}, "flow_run_id": {"any_": mine}}})


@pytest.mark.e2e
def test_flow_can_end_with_the_gate(two_commits, prefect_env, prefect_api):
    result = cli(prefect_env, "run", "--gate", "--repo", str(two_commits))
    gates = gate_verdicts(prefect_api, two_commits)
    previous = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=two_commits, capture_output=True, text=True)
    # The workspace is HEAD's run: the baseline is the run before it, never HEAD itself.
    assert gates and f"workspace against {previous.stdout.strip()[:7]} (the newest run on main before the candidate)" \
        in gates[0]["data"]
    if "Quality gate passed" in gates[0]["data"]:
        assert result.returncode == 0, result.stderr[-2000:]
    else:
        assert result.returncode == 1 and "error: quality gate failed: " in result.stderr
    # Against a registry stage: nothing holds prod here yet, so the run passes and says why.
    champion = cli(prefect_env, "run", "--champion", "prod", "--repo", str(two_commits))
    assert champion.returncode == 0, champion.stderr[-2000:]
    assert "no version holds 'prod' yet: the candidate passes" in gate_verdicts(prefect_api, two_commits)[0]["data"]


def result_repo(repo: Path, texts: dict[str, str]) -> Path:
    """A git repo whose one commit holds evaluate's files with the given texts (by what they hold)."""
    shutil.copy(REPO / "dvc.yaml", (repo.mkdir() or repo) / "dvc.yaml")
    for kind, path in evaluation_files(repo).items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_text(texts[kind])
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "run"], cwd=repo, check=True)
    return repo


@pytest.mark.parametrize(("what", "text", "message"), [
    ("metrics", "{not json", "results/evaluate/metrics.json of 'HEAD' is not valid JSON"),
    ("metrics", "[1, 2]", "results/evaluate/metrics.json of 'HEAD' has no numeric 'accuracy'"),
    ("metrics", '{"accuracy": "high"}', "has no numeric 'accuracy'"),
    ("report", '{"cat": {"recall": 1}}', "classification_report.json of 'HEAD' is not a classification report"),
    ("predictions", "a,b\n1,2\n", "predictions.csv of 'HEAD' lacks column(s) actual, predicted"),
    ("confusion", ",cat,dog\ncat,x,1\n", "confusion_matrix.csv of 'HEAD' lacks counts in column(s) cat"),
])
def test_hand_broken_result_files_are_data_errors_naming_the_file(tmp_path, what, text, message):
    """A metrics.json that was not JSON made compare and gate end in 'unexpected JSONDecodeError'."""
    from pipelines.runs import load_run
    from stages.common.errors import DataError

    good = {"metrics": '{"accuracy": 0.5}', "report": '{"cat": {"precision": 1, "recall": 1, "f1-score": 1}}',
            "predictions": "index,actual,predicted\n0,cat,cat\n", "confusion": ",cat\ncat,1\n"}
    repo = result_repo(tmp_path / "repo", {**good, what: text})
    with pytest.raises(DataError) as broken:
        load_run(repo, "HEAD")
    assert message in str(broken.value) and broken.value.exit_code == 3, broken.value


def test_a_pruned_sweep_point_is_refused_by_compare_and_gate_in_one_line(tmp_path):
    """Its evaluate records where it was pruned and no figures: compare and the gate read it as a
    broken file and told the user to rerun evaluate, which writes the same again."""
    from pipelines.runs import load_run

    repo = result_repo(tmp_path / "repo", {"metrics": '{"pruned_after_epoch": 2, "split": "test"}', "report": "{}",
                                           "predictions": "index,actual,predicted,probability\n", "confusion": ",cat\n"})
    with pytest.raises(ConfigError, match=r"^results/evaluate/metrics.json of 'HEAD' holds no test figures: its sweep's "
                                          r"pruner stopped its training after epoch 2; name a run that trained to its end$"):
        load_run(repo, "HEAD")


@pytest.mark.e2e
def test_plain_dvc_plots_show_draws_offline(two_commits, tmp_path):
    """Plain `dvc plots show` loaded Vega from a CDN unless the user passed a template that only a
    first `compare` had written; the project's .dvc/config names the offline one set-up writes."""
    from pipelines.compare import offline_plots_template
    from tests.helpers import not_blank, visit

    offline_plots_template(two_commits)
    dvc(two_commits, "plots", "show", "-o", str(tmp_path / "plots"))
    page = visit((tmp_path / "plots/index.html").as_uri(), tmp_path / "browser")
    assert page.external() == [] and page.failed == [] and page.charts >= 3 and not_blank(page.screenshot)


@pytest.mark.e2e
def test_a_challenger_is_gated_against_the_champion_in_prod_and_promoted_to_origin(history_repo, prefect_env,
                                                                                   tmp_path):
    """Champion and challenger: the baseline is the version in `prod` (origin's tags), not main's
    last run; a pass is registered, assigned `prod` and its tags pushed; a fail promotes nothing."""
    from tests.helpers import copy_repo

    source, shas = history_repo
    origin = tmp_path / "origin.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(source), str(origin)], check=True)
    repo = copy_repo(source, tmp_path / "clone")
    subprocess.run(["git", "remote", "add", "origin", str(origin)], cwd=repo, check=True)

    def gate(*args: str) -> subprocess.CompletedProcess:
        return cli(prefect_env, "gate", *args, "--repo", str(repo))

    def origin_tags() -> set[str]:
        listed = subprocess.run(["git", "ls-remote", "--tags", str(origin)], capture_output=True, text=True).stdout
        return {line.split("refs/tags/")[1] for line in listed.splitlines() if not line.endswith("^{}")}

    # Main's run (6 epochs, the workspace) against v0.0.2 in prod (5 epochs): passes, promoted to origin.
    passed = gate("--champion", "prod", "--register")
    assert passed.returncode == 0, passed.stderr
    assert f"against v0.0.2 ({shas[5][:7]}, in 'prod')" in passed.stdout
    assert "promoted cifar10-classifier v0.0.3" in passed.stdout and "tags pushed to origin" in passed.stdout
    assert {"cifar10-classifier@v0.0.3", "cifar10-classifier#prod#3"} <= origin_tags()
    # Nothing changed since: the champion is the candidate, nothing is promoted again.
    again = gate("--champion", "prod", "--register")
    assert again.returncode == 0 and "already in 'prod': nothing to promote" in again.stdout
    # A worse challenger (2 epochs) fails against v0.0.3 and promotes nothing.
    before = origin_tags()
    subprocess.run(["git", "checkout", "-q", shas[2]], cwd=repo, check=True)
    failed = gate("--champion", "prod", "--register")
    assert failed.returncode == 1 and "Quality gate FAILED" in failed.stdout and "against v0.0.3" in failed.stdout
    assert "error: quality gate failed: accuracy dropped by" in failed.stderr and origin_tags() == before
    # A stage nobody holds yet: the first candidate passes and becomes its champion.
    first = gate("--champion", "staging", "--register")
    assert first.returncode == 0 and "no version holds 'staging' yet" in first.stdout
    assert {"cifar10-classifier@v0.0.4"} == {t for t in origin_tags() - before if "@" in t}
    assert any(t.startswith("cifar10-classifier#staging#") for t in origin_tags() - before)
    # Origin unreachable: which version holds prod there is unknown, so nothing is judged on stale tags.
    subprocess.run(["git", "remote", "set-url", "origin", str(tmp_path / "gone.git")], cwd=repo, check=True)
    offline = gate("--champion", "prod", "--register")
    assert offline.returncode == 75 and offline.stderr.count("\n") == 1, offline.stderr
    assert "origin's tags cannot be fetched" in offline.stderr
    # Two baselines at once is a usage error.
    both = gate("--champion", "prod", "--baseline", "main")
    assert both.returncode == 2 and both.stderr.count("\n") == 1 and "drop --baseline" in both.stderr

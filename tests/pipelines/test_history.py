"""The history page and `compare --all` on a real git + DVC repo with commits on main, a side
branch, DVC experiments and GTO versions.

Training is not what is tested here, so one fast stage stands in for train and evaluate: it writes
their result files (metrics, report, confusion matrix, predictions, per-epoch curves) at the paths
the project's dvc.yaml names, from the project's params.yaml, in about a second."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import pytest
import yaml

from pipelines.registry import register
from tests.helpers import ENV, REPO, cli, dvc, not_blank, set_params, visit

SCORER = '''
"""Writes what train and evaluate would, from params.yaml: more epochs, better scores."""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from sklearn.metrics import classification_report, confusion_matrix, f1_score

params = yaml.safe_load(Path("params.yaml").read_text())
train = params["train"]
evaluate, curves = Path(sys.argv[1]), Path(sys.argv[2]) / "plots" / "metrics"
classes = np.array(["cat", "dog", "frog", "ship"])
accuracy = min(0.95, 0.3 + 0.08 * train["epochs"] - 0.1 * abs(np.log10(train["learning_rate"] / 1.5)))
n = 400
actual = np.arange(n) % 4
right = np.random.default_rng(train["epochs"]).permutation(n) < round(accuracy * n)
predicted = np.where(right, actual, (actual + 1 + np.arange(n) // 4 % 3) % 4)
evaluate.mkdir(parents=True, exist_ok=True)
pd.DataFrame({"index": range(n), "actual": classes[actual], "predicted": classes[predicted],
              "probability": 0.5}).to_csv(evaluate / "predictions.csv", index=False)
report = classification_report(classes[actual], classes[predicted], output_dict=True, zero_division=0)
(evaluate / "classification_report.json").write_text(json.dumps(report))
(evaluate / "classification_report.txt").write_text("")
pd.DataFrame(confusion_matrix(actual, predicted), index=classes, columns=classes).to_csv(
    evaluate / "confusion_matrix.csv")
(evaluate / "metrics.json").write_text(json.dumps({
    "loss": round(2 - accuracy * 1.5, 4), "accuracy": round(float((actual == predicted).mean()), 4),
    "f1_macro": round(float(f1_score(actual, predicted, average="macro")), 4), "images": n,
    "split": params["evaluate"]["split"],
    "data": "0123456789abcdef"}))
for split, offset in (("train", 0.05), ("eval", 0.0)):
    for metric in ("accuracy", "loss"):
        steps = np.arange(train["epochs"])
        values = accuracy * (steps + 1) / train["epochs"] + offset
        (curves / split).mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"step": steps, metric: values if metric == "accuracy" else 2 - values}).to_csv(
            curves / split / f"{metric}.tsv", sep="\\t", index=False)
'''

def scored_project(root):
    """A git + DVC repo with the project's params.yaml and dvc.yaml's paths, plots and model artifact,
    and one stage, `evaluate`, that runs SCORER."""
    root.mkdir(parents=True)
    declared = yaml.safe_load((REPO / "dvc.yaml").read_text())
    paths = declared["vars"][0]["paths"]
    declared["stages"] = {"evaluate": {
        "cmd": "python scorer.py ${paths.evaluate} ${paths.train}", "deps": ["scorer.py"],
        "params": ["train", "evaluate.split"],
        "outs": [{f"${{paths.evaluate}}/{name}": {"cache": False}} for name in
                 ("classification_report.json", "classification_report.txt", "confusion_matrix.csv",
                  "predictions.csv")] + [{"${paths.train}/plots": {"cache": False}}],
        "metrics": [{"${paths.evaluate}/metrics.json": {"cache": False}}]}}
    (root / "dvc.yaml").write_text(yaml.safe_dump(declared, sort_keys=False))
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "scorer.py").write_text(SCORER)
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True)
    for key, value in (("user.name", "t"), ("user.email", "t@example.invalid")):  # GTO tags as the user
        subprocess.run(["git", "config", key, value], cwd=root, check=True)
    dvc(root, "init", "-q")
    assert paths["evaluate"] == "results/evaluate"
    return root


def commit(repo, message: str, minutes: int, run: bool = True, **train) -> str:
    """A commit dated `minutes` from now (runs made in one second would tie in git's order)."""
    if train:
        set_params(repo / "params.yaml", train=train)
    if run:
        dvc(repo, "repro", "-q")
    date = f"@{int(time.time() + 60 * minutes)} +0000"
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", message], cwd=repo, check=True,
                   env={**ENV, "GIT_AUTHOR_DATE": date, "GIT_COMMITTER_DATE": date})
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()


@pytest.fixture(scope="module")
def history_repo(tmp_path_factory):
    """Main: a commit without a run, five runs (epochs 2..6), a docs commit; two experiments from the third run;
    a side branch with one run, evaluated on the val split; v0.0.1 at the second run, v0.0.2 at the
    fourth, prod moved to it.
    Commits before the experiments are dated in the past, those after in the future: DVC dates its
    experiments now."""
    repo = scored_project(tmp_path_factory.mktemp("history") / "project")
    shas = {"skeleton": commit(repo, "the pipeline, no run yet", -10, run=False)}
    for epochs in (2, 3, 4):
        shas[epochs] = commit(repo, f"{epochs} epochs", epochs - 10, epochs=epochs)
    for name, rate in (("lr-low", 0.5), ("lr-high", 15.0)):
        dvc(repo, "exp", "run", "-q", "-n", name, "-S", f"train.learning_rate={rate}")
    subprocess.run(["git", "checkout", "-q", "--", "."], cwd=repo, check=True)
    dvc(repo, "checkout", "-q")
    for epochs in (5, 6):
        shas[epochs] = commit(repo, f"{epochs} epochs", epochs, epochs=epochs)
    (repo / "NOTES.md").write_text("what we learnt\n")
    shas["docs"] = commit(repo, "docs: no run", 6.5, run=False)
    subprocess.run(["git", "checkout", "-q", "-b", "feature", shas[4]], cwd=repo, check=True)
    set_params(repo / "params.yaml", evaluate={"split": "val"})
    shas["feature"] = commit(repo, "a branch's run", 7, epochs=7)
    subprocess.run(["git", "checkout", "-q", "main"], cwd=repo, check=True)
    dvc(repo, "checkout", "-q")
    assert register(repo, shas[3], "prod").version == "v0.0.1"
    time.sleep(1.1)  # GTO orders a stage's assignments by their tags' dates, whole seconds
    assert register(repo, shas[5], "prod").version == "v0.0.2"
    return repo, shas


@pytest.mark.e2e
def test_history_page_shows_every_run_with_metrics_and_main_s_trend(history_repo, prefect_env, tmp_path):
    repo, shas = history_repo
    result = cli(prefect_env, "compare", "--all", "--json", "--pages", "3", "--repo", str(repo))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    runs = {r["rev"]: r for r in data["runs"]}
    # Every run: five on main, the branch's, two experiments; no commit without (or with the same) run.
    assert shas["skeleton"] not in runs and shas["docs"] not in runs and len(runs) == 8, runs.keys()
    assert sorted(r["name"] for r in data["runs"] if r["kind"] == "experiment") == ["lr-high", "lr-low"]
    assert all(r["baseline"] == shas[4] for r in data["runs"] if r["kind"] == "experiment")
    # The params shown are those that differ from main's tip (6 epochs).
    assert runs[shas[2]]["params"] == {"train.epochs": 2} and runs[shas[6]]["params"] == {}
    assert next(r for r in data["runs"] if r["name"] == "lr-low")["params"] == {"train.epochs": 4,
                                                                              "train.learning_rate": 0.5}
    # The trend follows main's first parents, oldest first; the branch's run is not on it.
    assert [p["rev"] for p in data["trend"]] == [shas[e] for e in (2, 3, 4, 5, 6)]
    assert [p["accuracy"] for p in data["trend"]] == sorted(p["accuracy"] for p in data["trend"])
    assert runs[shas[3]]["registry"] == ["v0.0.1"] and runs[shas[5]]["registry"] == ["v0.0.2", "prod"]
    # Ranked by accuracy, as the table; the three best but main's tip have a page, the rest a command.
    # The best was evaluated on another split: its row says so, and the page goes on.
    accuracies = [r["metrics"]["accuracy"] for r in data["runs"]]
    assert accuracies == sorted(accuracies, reverse=True)
    with_page = [r for r in data["runs"] if r["page"]]
    assert [r["rev"] for r in with_page] == [shas[5], shas[4]]
    assert "on the test split and" in runs[shas["feature"]]["page_error"]
    folder = repo / "comparisons"
    assert all((folder / r["page"]).is_file() for r in with_page)
    assert next(r for r in data["runs"] if r["name"] == "lr-low")["compare_command"] == \
        "cifar10-pipeline compare main lr-low"

    page = visit((folder / "history.html").as_uri(), tmp_path / "browser", settle_s=0.5, script=[
        "document.querySelectorAll('#trend circle.commit.accuracy').length",
        "document.querySelectorAll('#trend circle.experiment.accuracy').length",
        "[...document.querySelectorAll('#runs tbody tr')].map(r => r.cells[1].textContent)",
        # a user sorts by accuracy, then filters to the experiments
        ("[...document.querySelectorAll('#runs th')].find(th => th.textContent === 'accuracy').click(),"
        " [...document.querySelectorAll('#runs tbody tr')].map(r => r.cells[1].textContent)"),
        ("(e => (e.value = 'experiment', e.dispatchEvent(new Event('input'))))(document.getElementById('filter')),"
        " [...document.querySelectorAll('#runs tbody tr')].filter(r => !r.hidden).length"),
    ])
    points, rings, newest_first, by_accuracy, filtered = page.values
    assert page.external() == [] and page.failed == [] and not_blank(page.screenshot)
    assert points == 5 and rings == 2
    assert newest_first[0] == "feature" and newest_first[-1] == shas[2][:7]
    assert by_accuracy == [r["name"] for r in data["runs"]] and by_accuracy != newest_first
    assert filtered == 2
    assert "v0.0.2 prod" in page.text and "cifar10-pipeline compare main lr-low" in page.text

    typo = cli(prefect_env, "compare", "--all", "--sort-by", "acuracy", "--repo", str(repo))
    assert typo.returncode == 2 and typo.stderr.strip().splitlines() == [
        "error: no run has a metric 'acuracy'; pass --sort-by one of: accuracy, f1_macro, images, loss"]


@pytest.mark.e2e
def test_two_run_page_draws_curves_and_readable_matrices(history_repo, prefect_env, tmp_path):
    repo, shas = history_repo
    out = tmp_path / "pair"
    result = cli(prefect_env, "compare", shas[2], "lr-high", "--out", str(out), "--json", "--repo", str(repo))
    assert result.returncode == 0, result.stderr
    findings = json.loads(result.stdout)
    changes = [abs(row["Δ F1"]) for row in findings["per_class"]]
    assert changes == sorted(changes, reverse=True) and len(changes) == 4
    page = visit((out / "compare.html").as_uri(), tmp_path / "browser", settle_s=0.5, script=[
        # each figure: drawn, and shown at its own size (never scaled down, so its text stays legible)
        "[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.width])",
    ])
    shown = {src: (natural, width) for src, natural, width in page.values[0]}
    assert set(shown) == {"confusion.png", "confusion_difference.png", "curves.png"}
    assert all(natural > 300 and natural == width for natural, width in shown.values()), shown
    assert page.external() == [] and "Per class, largest change in F1 first" in page.text and not_blank(page.screenshot)


def test_the_figures_text_is_legible_and_the_scales_shared():
    """Counts in cells at 11 px or more; both matrices on one colour scale, the difference centred on zero."""
    import pandas as pd

    from pipelines.compare import FIGURE_DPI, confusion_figures

    labels = ["cat", "dog", "frog"]
    a = pd.DataFrame([[90, 5, 5], [10, 80, 10], [0, 0, 100]], index=labels, columns=labels)
    b = pd.DataFrame([[95, 5, 0], [30, 60, 10], [0, 0, 100]], index=labels, columns=labels)
    pair, diff = confusion_figures(a, b, "A", "B")
    left, right = (ax.images[0] for ax in pair.axes[:2])
    assert left.get_clim() == right.get_clim() == (0, 100)
    assert diff.axes[0].images[0].get_clim() == (-20, 20) and diff.axes[0].images[0].get_cmap().name == "RdBu"
    assert len(pair.axes) == 3 and len(diff.axes) == 2  # one colour bar each
    cells = [t for ax in (*pair.axes[:2], diff.axes[0]) for t in ax.texts]
    assert len(cells) == 27 and min(t.get_fontsize() for t in cells) * FIGURE_DPI / 72 >= 11
    assert all(ax.get_xlabel() == "predicted" and ax.get_ylabel() == "actual" for ax in (*pair.axes[:2], diff.axes[0]))

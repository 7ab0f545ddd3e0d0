"""End to end: the real `dvc` CLI in a fresh git repo, on a generated dataset, 1 epoch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import httpx
import pytest
import yaml

from tests.helpers import (
    BIN,
    ENV,
    REPO,
    STAGES,
    cli,
    copy_repo,
    dvc,
    git_dvc_project,
    inference_api,
    not_blank,
    set_params,
    stage_command,
    stages_run,
    tiny_params,
    visit,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_archive):
    repo = git_dvc_project(tmp_path_factory.mktemp("e2e") / "project")
    set_params(repo / "params.yaml", **tiny_params(tiny_archive))
    result = dvc(repo, "repro")
    assert stages_run(result.stdout) == STAGES
    # TensorFlow's native start-up lines (CUDA stubs, oneDNN, cuInit) are kept out of the stages' output.
    noise = [line for line in (result.stdout + result.stderr).splitlines() if re.match(r"[IWE]0000 |WARNING: All log", line)]
    assert noise == [], noise
    return repo


@pytest.fixture
def project(built, tmp_path):
    """Each test starts from the same freshly built repo, whatever the tests before it changed."""
    return copy_repo(built, tmp_path / "project")


def test_repro_writes_every_stage_output(project):
    import pandas as pd

    metrics = json.loads((project / "results/evaluate/metrics.json").read_text())
    predictions = pd.read_csv(project / "results/evaluate/predictions.csv")
    confusion = pd.read_csv(project / "results/evaluate/confusion_matrix.csv", index_col=0).to_numpy()
    # The headline agrees with the per-image predictions and the confusion matrix it came from.
    assert metrics["images"] == 50 == len(predictions) == confusion.sum()
    assert metrics["accuracy"] == round(float((predictions["actual"] == predictions["predicted"]).mean()), 4)
    assert metrics["accuracy"] == round(float(confusion.trace() / confusion.sum()), 4)
    assert metrics["split"] == "test" and len(metrics["data"]) == 16
    assert (project / "models/model.keras").stat().st_size > 0
    assert "expect_column_values_to_be_in_set" in (project / "results/validate/validation.html").read_text()
    assert "## Data validation (Great Expectations)" in (project / "results/report/report.md").read_text()
    assert json.loads((project / "results/validate/summary.json").read_text())["success"] is True
    report = (project / "results/report/report.md").read_text()
    assert "| accuracy |" in report and "![Confusion matrix](confusion_matrix.png)" in report
    assert (project / "results/report/report.html").is_file()
    assert (project / "results/train/metrics.json").is_file()
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == STAGES
    # Data and models go to DVC, not git.
    ignored = subprocess.run(["git", "check-ignore", "data/raw", "data/prepared", "models/model.keras"],
                             cwd=project, capture_output=True, text=True).stdout.split()
    assert ignored == ["data/raw", "data/prepared", "models/model.keras"]


def test_report_and_validation_pages_draw_offline_in_chromium(project, tmp_path):
    seen = {page: visit((project / page).as_uri(), tmp_path / page.replace("/", "_"))
            for page in ("results/report/report.html", "results/validate/validation.html")}
    for page, visited in seen.items():
        assert visited.external() == [] and visited.failed == [], page
        assert not_blank(visited.screenshot), page
    validation, report = seen["results/validate/validation.html"], seen["results/report/report.html"]
    assert validation.text.startswith("Data validation:") and "expect_table_row_count_to_equal" in validation.text
    assert report.images == (4, 4)  # curves, confusion matrix, misclassified and sample grids all decode
    assert "Data validation (Great Expectations)" in report.text and "Model card" in report.text


def test_training_shows_a_live_progress_bar_only_at_a_terminal(project):
    import os
    import pty

    primary, secondary = pty.openpty()
    env = {**ENV, "PYTHONPATH": str(project)}
    proc = subprocess.Popen(stage_command("train"), cwd=project, env=env, stdin=secondary, stdout=secondary,
                            stderr=secondary, close_fds=True)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: the stage ended
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(primary)
    assert proc.wait(timeout=600) == 0, b"".join(chunks)[-2000:]
    at_terminal = b"".join(chunks).decode(errors="replace")
    assert "━" in at_terminal and "\r" in at_terminal  # Keras' bar, redrawn in place
    logged = dvc(project, "repro", "-f", "train").stdout  # DVC's pipe: one line per epoch
    assert "━" not in logged and re.search(r"\d+/\d+ - \d+s - .*val_accuracy", logged)


def test_metrics_and_plots_render(project):
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    assert "accuracy" in json.dumps(shown)
    dvc(project, "plots", "show", "-o", "plots_out")
    page = (project / "plots_out" / "index.html").read_text()
    assert "Confusion matrix" in page and "Accuracy per epoch" in page


def test_noop_repro_runs_nothing(project):
    result = dvc(project, "repro")
    assert stages_run(result.stdout) == set()
    assert "up to date" in result.stdout


def test_time_to_accuracy_is_read_from_the_run(project):
    seconds = (project / "results/train/plots/metrics/train/epoch_seconds.tsv").read_text().splitlines()
    assert len(seconds) == 2 and float(seconds[1].split("\t")[1]) > 0  # header + the one epoch
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/time_to_accuracy.py"),
                             "--repo", str(project), "--targets", "0.0", "1.01"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    accuracy = json.loads((project / "results/evaluate/metrics.json").read_text())["accuracy"]
    assert f"test accuracy **{accuracy:.4f}**" in result.stdout
    assert re.search(r"\| 0\.0 \| 1 \| [\d.]+ \|", result.stdout) and "| 1.01 | not reached | |" in result.stdout


def test_time_to_accuracy_names_a_missing_run(tmp_path):
    script = REPO / "benchmarks/time_to_accuracy.py"
    result = subprocess.run([sys.executable, str(script), "--repo", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 3 and result.stderr.startswith("error: ") and "not found; run `dvc repro`" in result.stderr


@pytest.mark.parametrize(
    "section, change, expected",
    [
        ("report", {"dpi": 60}, {"report"}),
        # The export's signature.json carries the evaluation's metrics.
        ("evaluate", {"split": "val"}, {"evaluate", "export", "report"}),
        # Same predictions in other batches: evaluate's outputs are unchanged, so DVC skips the rest.
        ("evaluate", {"batch_size": 7}, {"evaluate"}),
        ("export", {"onnx_opset": 15}, {"export"}),
        ("train", {"epochs": 2}, {"train", "evaluate", "export", "report"}),
    ],
)
def test_a_param_change_reruns_exactly_its_stage_and_downstream(project, section, change, expected):
    set_params(project / "params.yaml", **{section: change})
    assert stages_run(dvc(project, "repro").stdout) == expected


def test_a_registered_model_version_is_listed_and_served_by_its_tag(project):
    """The model registry: `register` tags the commit (GTO), `gto show` lists it, and the API serves
    the export of that tag from DVC's cache, whatever the workspace holds now."""
    import hashlib

    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run(["git", "commit", "-qm", "a trained model"], cwd=project, check=True)
    first = cli(ENV, "register", "--stage", "prod", "--repo", str(project))
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("registered cifar10-classifier v0.0.1 at ") and "stage 'prod'" in first.stdout
    again = cli(ENV, "register", "--repo", str(project))  # the same commit keeps its version
    assert again.returncode == 0 and "v0.0.1" in again.stdout
    shown = json.loads(subprocess.run([str(BIN / "gto"), "show", "--json"], cwd=project, capture_output=True,
                                      text=True, check=True).stdout)
    assert shown["cifar10-classifier"]["version"] == "v0.0.1" and shown["cifar10-classifier"]["stage"]["prod"] == "v0.0.1"
    md5 = hashlib.md5((project / "models/model.keras").read_bytes()).hexdigest()
    shutil.rmtree(project / "models/export")  # served from the tag's commit, not the workspace
    with inference_api("--rev", "cifar10-classifier@v0.0.1", "--repo", str(project)) as (url, _):
        meta = httpx.get(f"{url}/metadata").json()
    assert meta["model_md5"] == md5 and meta["test_accuracy"] is not None
    # The export names the commit that holds it, not the HEAD of the moment it was exported.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert meta["git_rev"] == head
    bad = cli(ENV, "register", "no-such-branch", "--repo", str(project))
    assert bad.returncode == 2 and bad.stderr.startswith("error: 'no-such-branch' is no commit of ")


def test_failed_validation_stops_the_pipeline(tmp_path, tiny_archive):
    repo = git_dvc_project(tmp_path / "project")
    params = tiny_params(tiny_archive)
    params["validate"] = {"expected_per_class": {"train": 21, "test": 5}}  # one image per class missing
    set_params(repo / "params.yaml", **params)
    result = dvc(repo, "repro", check=False)
    assert result.returncode != 0
    assert "error: validation failed" in result.stderr and "expected_count" in result.stderr
    assert not (repo / "models/model.keras").exists()
    assert set(yaml.safe_load((repo / "dvc.lock").read_text())["stages"]) == {"download", "prepare"}
    page = (repo / "results/validate/validation.html").read_text()  # the failure is inspectable
    assert "see results/validate/validation.html" in result.stderr and "<strong>FAIL</strong>" in page

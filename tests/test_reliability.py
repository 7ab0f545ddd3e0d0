"""Faults a nightly run meets, each through the real CLI: they fail loudly and lose nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pipelines.dvcrepo import with_default_sigint
from tests import synthetic
from tests.helpers import (
    BIN,
    DIVERGES,
    ENV,
    copy_repo,
    dvc,
    git_dvc_project,
    set_params,
    sha256_of,
    stages_run,
    tiny_params,
)

pytestmark = pytest.mark.e2e

# train.arch is per model: the default's fast_vgg options stay and leaky_bn_cnn uses its own defaults.
# The default's learning rate is set for batches of 1024 (BatchNorm offsets at 64x it): at 16 it diverges.
SLOW_TRAIN = {"model": "leaky_bn_cnn", "epochs": 4, "batch_size": 16, "learning_rate": 0.02, "bias_lr_scale": 1.0}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A repo whose data is prepared and validated, with enough images that an epoch takes a moment."""
    root = tmp_path_factory.mktemp("reliability")
    archive = synthetic.write_tar_gz(root / "data.tar.gz", synthetic.class_folder_files(60, 5))
    repo = git_dvc_project(root / "project")
    params = tiny_params(archive)
    params["validate"] = {"expected_per_class": {"train": 60, "test": 5}}
    set_params(repo / "params.yaml", **params)
    dvc(repo, "repro", "validate")
    return repo


@pytest.fixture
def prepared_project(prepared, tmp_path):
    """Each test's own copy: none sees another's params, outputs or deleted cache."""
    return copy_repo(prepared, tmp_path / "project")


def start_repro(repo: Path, *targets: str) -> subprocess.Popen:
    # SIGINT as at a terminal, also when the tests run as a background job (which ignores it and
    # would hand that on to dvc and the stage).
    return subprocess.Popen(with_default_sigint([str(BIN / "dvc"), "repro", *targets]), cwd=repo, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def read_until(proc: subprocess.Popen, marker: str, timeout: float = 300) -> str:
    seen, deadline = [], time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"'{marker}' never appeared:\n{''.join(seen)}")


def test_killed_training_resumes_from_its_last_epoch(prepared_project):
    repo = prepared_project
    set_params(repo / "params.yaml", train=SLOW_TRAIN)
    lock_before = (repo / "dvc.lock").read_text()
    proc = start_repro(repo, "train")
    read_until(proc, "Epoch 3/4")  # two epochs finished and backed up
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert (repo / "dvc.lock").read_text() == lock_before
    assert not (repo / "models/model.keras").exists()

    result = dvc(repo, "repro", "train")
    assert "resuming after epoch 2" in result.stdout
    assert "Epoch 3/4" in result.stdout and "Epoch 1/4" not in result.stdout
    for curve in ("train/loss", "eval/accuracy"):
        rows = (repo / f"results/train/plots/metrics/{curve}.tsv").read_text().splitlines()
        assert [r.split("\t")[0] for r in rows[1:]] == ["0", "1", "2", "3"]
    assert json.loads((repo / "results/train/run_info.json").read_text())["resumed_after_epoch"] == 2
    assert not any((repo / ".dvc/tmp/train-backup").iterdir())

    # A changed param starts afresh instead of resuming someone else's run.
    set_params(repo / "params.yaml", train={"epochs": 2})
    assert "resuming" not in dvc(repo, "repro", "train").stdout


def test_interrupted_repro_leaves_lock_and_outputs_as_they_were(prepared_project):
    repo = prepared_project
    set_params(repo / "params.yaml", train={**SLOW_TRAIN, "seed": 3})
    dvc(repo, "repro", "train")
    lock_before = (repo / "dvc.lock").read_text()
    set_params(repo / "params.yaml", train={"seed": 4, "epochs": 30})  # far from done when interrupted
    proc = start_repro(repo, "train")
    read_until(proc, "Epoch 2/30")
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-3000:]
    assert (repo / "dvc.lock").read_text() == lock_before
    leftovers = [p for p in repo.rglob("*.tmp*") if ".dvc" not in p.parts]
    assert leftovers == []
    # The workspace takes the next run (a short one: the 30 epochs were only there to be interrupted).
    set_params(repo / "params.yaml", train={"seed": 4, "epochs": 1})
    assert stages_run(dvc(repo, "repro", "train").stdout) == {"train"}
    assert (repo / "dvc.lock").read_text() != lock_before


def test_diverging_training_exits_5_and_writes_no_model(prepared_project):
    repo = prepared_project
    set_params(repo / "params.yaml", train=DIVERGES)
    result = dvc(repo, "repro", "train", check=False)
    assert result.returncode != 0
    assert "exited with 5" in result.stderr
    # Either NaN loss stopped it, or the loss stayed finite while weights did not: both are caught.
    assert re.search(r"error: training (diverged \(loss nan|ended with non-finite weights)", result.stderr)
    assert not (repo / "models/model.keras").exists()


def test_require_gpu_without_one_is_a_clear_error(prepared_project):
    repo = prepared_project
    set_params(repo / "params.yaml", train={"model": "tutorial_cnn", "arch": {}, "epochs": 1, "optimizer": "adam",
                                            "learning_rate": 0.001, "require_gpu": True})
    result = dvc(repo, "repro", "train", check=False)
    assert "exited with 2" in result.stderr
    assert "error: train.require_gpu is true but TensorFlow sees no GPU" in result.stdout + result.stderr


def test_same_seed_gives_identical_metrics_and_records_versions(prepared_project):
    repo = prepared_project
    set_params(repo / "params.yaml", train={"model": "tutorial_cnn", "arch": {}, "epochs": 2, "optimizer": "adam",
                                            "learning_rate": 0.001, "require_gpu": False, "seed": 11})
    dvc(repo, "repro", "evaluate")
    first = (repo / "results/evaluate/metrics.json").read_text()
    dvc(repo, "repro", "--force", "--single-item", "train")
    dvc(repo, "repro", "--single-item", "evaluate")
    assert (repo / "results/evaluate/metrics.json").read_text() == first
    info = json.loads((repo / "results/train/run_info.json").read_text())
    assert info["seed"] == 11 and set(info["versions"]) == {"python", "numpy", "tensorflow", "keras"}


def test_a_second_repro_is_refused_while_one_runs(prepared_project):
    repo = prepared_project
    set_params(repo / "params.yaml", train={**SLOW_TRAIN, "seed": 21})
    proc = start_repro(repo, "train")
    read_until(proc, "Epoch 1/4")
    second = dvc(repo, "repro", "train", check=False)
    out, _ = proc.communicate(timeout=300)
    # DVC locks each output it reads or writes: the second run is refused, naming the busy path.
    assert second.returncode != 0 and "is busy, it is being blocked by" in second.stderr
    assert proc.returncode == 0, out
    assert stages_run(dvc(repo, "repro", "train").stdout) == set()


def test_unreachable_prefect_api_is_named_and_can_fall_back(prepared_project, tmp_path):
    repo = prepared_project
    env = {**ENV, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path)}
    refused = subprocess.run([str(BIN / "cifar10-pipeline"), "run", "--repo", str(repo)], env=env,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 75
    assert refused.stderr.strip() == (
        "error: the Prefect API at http://127.0.0.1:9/api is unreachable; start it (cifar10-pipeline server), "
        "unset PREFECT_API_URL to use a temporary one, or rerun with --fallback to run plain `dvc repro`"
    )
    fallback = subprocess.run([str(BIN / "cifar10-pipeline"), "run", "--repo", str(repo), "--fallback",
                               "--set", "report.dpi=61", "--set", "train.learning_rate=1e-3", "--champion", "prod"],
                              env=env, capture_output=True, text=True, timeout=600)
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "running plain `dvc repro`" in fallback.stderr
    # The gate asked for needs no Prefect: plain dvc repro still ends with it (it was dropped).
    assert "Quality gate passed" in fallback.stdout and "no version holds 'prod' yet" in fallback.stdout
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["report"]["dpi"] == 61 and params["train"]["learning_rate"] == 0.001


def test_corrupted_remote_object_is_detected_not_checked_out(prepared_project, tmp_path):
    repo = prepared_project
    remote = tmp_path / "remote"
    dvc(repo, "remote", "add", "--local", "-f", "store", str(remote))
    dvc(repo, "remote", "modify", "--local", "store", "verify", "true")
    dvc(repo, "push", "-r", "store", "data/raw")
    lock_before = (repo / "dvc.lock").read_text()
    objects = [p for p in (remote / "files" / "md5").rglob("*") if p.is_file() and not p.name.endswith(".dir")]
    for obj in objects:
        obj.write_bytes(b"corrupted" + obj.read_bytes()[9:])
    subprocess.run(["rm", "-rf", str(repo / ".dvc/cache"), str(repo / "data/raw")], check=True)
    result = dvc(repo, "pull", "-r", "store", "data/raw", check=False)
    assert result.returncode != 0, result.stdout
    # Nothing of the corrupted objects was checked out, and the lock still names the good version.
    assert not (repo / "data/raw").exists() or not any((repo / "data/raw").rglob("*"))
    assert (repo / "dvc.lock").read_text() == lock_before
    assert "failed to pull" in (result.stdout + result.stderr).lower()


def test_bad_images_are_named_or_converted_and_counted(in_tmp):
    from io import BytesIO

    from PIL import Image

    from tests.helpers import run_stage

    files = synthetic.class_folder_files(20, 5)
    buf = BytesIO()
    import numpy as np

    Image.fromarray(np.arange(1200, dtype=np.uint8).reshape(30, 40)).save(buf, format="PNG")  # grey, not blank
    odd = next(name for name in files if name.startswith("train/cat/"))
    files[odd] = buf.getvalue()  # replaces a good image: counts stay as validate expects
    archive = synthetic.write_tar_gz(in_tmp / "odd.tar.gz", files)
    params = tiny_params(archive)
    set_params(in_tmp / "params.yaml", **params)
    assert run_stage("download", in_tmp).returncode == 0
    strict = run_stage("prepare", in_tmp)
    assert strict.returncode == 3
    assert strict.stderr.strip() == (f"error: {odd} is 40x30 L, expected 32x32 RGB; "
                                     "fix the file or set prepare.convert_images: true to convert it")
    assert not (in_tmp / "data/prepared").exists()

    set_params(in_tmp / "params.yaml", prepare={"convert_images": True})
    assert run_stage("prepare", in_tmp).returncode == 0
    validated = run_stage("validate", in_tmp)
    assert validated.returncode == 0, validated.stderr
    assert json.loads((in_tmp / "results/validate/summary.json").read_text())["converted_images"] == 1

    broken_name = next(name for name in files if name.startswith("test/dog/"))
    files[broken_name] = b"\x89PNG broken"
    synthetic.write_tar_gz(archive, files)
    set_params(in_tmp / "params.yaml", download={"sha256": sha256_of(archive)})  # new content, new pin
    assert run_stage("download", in_tmp).returncode == 0
    broken = run_stage("prepare", in_tmp)
    assert broken.returncode == 3 and broken.stderr.startswith(f"error: {broken_name} cannot be decoded")

"""The GPU benchmark trains the train stage's recipe on NumPy arrays; checked here on the CPU."""

from __future__ import annotations

import json
import sys

import pytest

from tests import synthetic
from tests.helpers import REPO, run_benchmark

pytestmark = pytest.mark.slow  # runs the benchmark script, which trains

SCRIPT = REPO / "benchmarks" / "gpu_recipe.py"


def test_first_reaching_counts_training_seconds_up_to_the_epoch():
    sys.path.insert(0, str(SCRIPT.parent))
    from gpu_recipe import first_reaching

    epochs = [{"epoch": 1, "seconds": 10.0, "val_accuracy": 0.5}, {"epoch": 2, "seconds": 2.0, "val_accuracy": 0.91},
              {"epoch": 3, "seconds": 2.0, "val_accuracy": 0.95}]
    assert first_reaching(epochs, 0.9) == (2, 12.0) and first_reaching(epochs, 0.99) is None


def test_a_preset_trains_and_records_every_epoch(tmp_path):
    archive = synthetic.write_tar_gz(tmp_path / "tiny.tar.gz", synthetic.class_folder_files(20, 5))
    out = tmp_path / "record.json"
    result = run_benchmark(SCRIPT.name, "--archive", str(archive), "--preset", "seed003", "--set", "train.epochs=2",
                           "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["preset"] == "seed003" and record["train_images"] == 180 and record["val_images"] == 20
    assert [e["epoch"] for e in record["epochs"]] == [1, 2] and all(e["seconds"] > 0 for e in record["epochs"])
    assert 0.0 <= record["test_accuracy"] <= 1.0 and set(record["reached"]) == {"0.85", "0.88", "0.9", "0.93", "0.94"}
    assert f"seed003: test accuracy {record['test_accuracy']:.4f}" in result.stdout


def test_the_gpu_preset_trains_on_jax_as_a_lent_gpu_runs_it(tmp_path):
    # The GPU machine has Keras on JAX and no TensorFlow: the whole recipe (whitening stem fitted in
    # NumPy, alternating flips and lookahead set from callbacks, mixed precision, XLA) must learn
    # there, so here it runs on JAX's CPU backend with the preset's settings, small batches excepted.
    archive = synthetic.write_tar_gz(tmp_path / "tiny.tar.gz", synthetic.class_folder_files(20, 5))
    out = tmp_path / "record.json"
    result = run_benchmark(SCRIPT.name, "--archive", str(archive), "--preset", "gpu-fast",
                           "--set", "train.batch_size=30", "--set", "train.warmup_epochs=2", "--out", str(out),
                           backend="jax")
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["backend"] == "jax" and record["policy"] == "mixed_bfloat16" and len(record["epochs"]) == 10
    assert record["epochs"][-1]["val_accuracy"] >= 0.8 and record["test_accuracy"] >= 0.8

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import BIN, commit, dvc, prefect_server, scored_project, set_params

CLASSES = ["airplane", "automobile", "bird", "cat"]  # the classes of the `exported` model


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 (SQLite in a temporary PREFECT_HOME); yields its API URL."""
    with prefect_server(tmp_path_factory.mktemp("prefect_home")) as url:
        yield url


@pytest.fixture
def prefect_env(prefect_api, tmp_path):
    return {**os.environ, "PREFECT_API_URL": prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(tmp_path / "client_home")}


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Path:
    """An export folder as the export stage writes it, from a small model fitted for a few epochs to
    tell the synthetic classes apart (tests.synthetic.make_images), so pages and clients can check
    that an image comes back as its class."""
    import keras

    from stages import export as stage
    from stages.common import dataio, models
    from stages.common.colour import colour_statistics
    from stages.common.params import parse_section
    from stages.common.schemas import ExportParams
    from stages.common.serving import EXPORTED
    from tests.synthetic import make_images

    folder = tmp_path_factory.mktemp("export")
    params = parse_section({"formats": ["onnx"], "onnx_opset": 17, "max_probability_diff": 1e-4,
                            "min_top1_agreement": 0.999, "batch_size": 16}, ExportParams, "export")
    images, labels = make_images(40, CLASSES)
    # The same model whatever tests ran before in this process (a seed, a dtype policy they left
    # set): one fitted for 4 epochs from whatever state they left once took a bird for a cat in CI.
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("float32")
    model = models.build_model("bn_cnn", len(CLASSES), [120.0] * 3, [60.0] * 3, {})
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32), labels, epochs=8, batch_size=32, verbose=0)
    stage.export(model, images[::10], params, folder)
    version = {"code_rev": "0" * 40, "model_md5": "f" * 32, "version": "0000000-ffffffff"}
    dataio.write_json(folder / EXPORTED["signature"],
                      stage.signature(CLASSES, params, version, {"accuracy": 0.5, "split": "test"},
                                      colour_statistics(images), None))
    return folder


@pytest.fixture(scope="session")
def history_repo(tmp_path_factory):
    """A git + DVC repo of runs by the fast scoring stage (tests.helpers.scored_project). Main: a
    commit without a run, five runs (epochs 2..6), a docs commit; two experiments from the third
    run; a side branch with one run, evaluated on the val split; v0.0.1 at the second run, v0.0.2
    at the fourth, prod moved to it. Tests that change it work on a copy (tests.helpers.copy_repo).
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
    from pipelines.registry import register

    assert register(repo, shas[3], "prod").version == "v0.0.1"
    time.sleep(1.1)  # GTO orders a stage's assignments by their tags' dates, whole seconds
    assert register(repo, shas[5], "prod").version == "v0.0.2"
    return repo, shas

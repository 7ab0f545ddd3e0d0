import shutil
import subprocess

import pytest
import yaml

from stages.common import run_params as presets
from stages.common.errors import ConfigError
from stages.common.params import load_section
from stages.common.schemas import TrainParams
from tests.helpers import REPO


@pytest.mark.parametrize("name", presets.available())
def test_every_preset_validates_against_the_params_schema(tmp_path, name):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    values = presets.apply(params, name)
    train = load_section("train", params)
    load_section("prepare", params)
    load_section("evaluate", params)
    # What params.yaml now holds is the preset over _base, key by key.
    expected = presets.resolve(name)
    assert values == expected
    for key, value in expected["train"].items():
        got = getattr(train, key)
        assert (got.__dict__ if key == "augment" else got) == value, key
    assert train.options == (expected["train"]["arch"].get(expected["train"]["model"]) or {})


def test_switching_presets_leaves_nothing_behind_and_keeps_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    presets.apply(params, "gpu-fast")
    presets.apply(params, "seed001")
    values = yaml.safe_load(params.read_text())
    assert values["train"]["model"] == "leaky_bn_cnn" and values["train"]["mixed_precision"] is False
    assert values["train"]["arch"] == {"leaky_bn_cnn": {"widths": [32, 64, 128], "dropouts": [0.2, 0.3, 0.4],
                                                        "dense": 512}}
    assert values["download"] == yaml.safe_load((REPO / "params.yaml").read_text())["download"]
    assert "# Every knob of the pipeline." in params.read_text()
    text = params.read_text()
    # Untouched lines keep their comments; a changed one loses the comment about its old value.
    assert "  md5: c58f30108f718f92721af3b95e74349a   # null to skip; a mismatch fails the stage\n" in text
    assert "  learning_rate: 0.001\n" in text and "at batch 1024" not in text


def test_presets_differ_where_the_seeds_differ():
    seed001, seed003 = presets.resolve("seed001"), presets.resolve("seed003")
    assert (seed001["train"]["model"], seed001["train"]["epochs"]) == ("leaky_bn_cnn", 40)
    assert (seed003["train"]["model"], seed003["train"]["batch_size"]) == ("tutorial_cnn", 32)


def test_unknown_or_invalid_preset(tmp_path):
    with pytest.raises(ConfigError, match="no preset 'seed9'; available: "):
        presets.resolve("seed9")
    (tmp_path / "_base.yaml").write_text((presets.PRESETS_DIR / "_base.yaml").read_text())
    (tmp_path / "bad.yaml").write_text("train: {epochs: 0}\n")
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    before = params.read_text()
    with pytest.raises(ConfigError, match="'train.epochs' is 0"):
        presets.apply(params, "bad", tmp_path)
    assert params.read_text() == before


@pytest.mark.slow
def test_gpu_fast_preset_trains_on_the_cpu_with_tiny_data():
    import numpy as np

    from stages.common.params import parse_section
    from stages.train import train
    from tests import synthetic

    section = {**yaml.safe_load((REPO / "params.yaml").read_text())["train"], **presets.resolve("gpu-fast")["train"]}
    params = parse_section({**section, "epochs": 1, "batch_size": 16}, TrainParams, "train")
    assert params.mixed_precision and params.xla
    images, labels = synthetic.make_images(8, ["a", "b"])
    splits = {"train": (images[::2], labels[::2]), "val": (images[1::2], labels[1::2])}
    try:
        _, history = train(params, splits, ["a", "b"], {"mean": [120.0] * 3, "std": [60.0] * 3})
    finally:
        import keras

        keras.mixed_precision.set_global_policy("float32")
    assert np.isfinite(history["loss"][0])


def test_presets_are_read_from_the_project_not_only_the_installed_package(tmp_path):
    from tests.helpers import BIN

    project = tmp_path / "project"
    (project / "presets").mkdir(parents=True)
    shutil.copy(REPO / "presets" / "_base.yaml", project / "presets" / "_base.yaml")
    (project / "presets" / "team-recipe.yaml").write_text("train: {epochs: 3}\n")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    shutil.copy(REPO / "dvc.yaml", project / "dvc.yaml")
    cli = str(BIN / "cifar10-pipeline")
    (project / "presets" / "team-recipe.yaml").write_text("# The team's recipe. Three epochs.\ntrain: {epochs: 3}\n")
    listed = subprocess.run([cli, "preset", "--repo", str(project)], capture_output=True, text=True, timeout=300)
    assert listed.stdout == "team-recipe  The team's recipe\n", listed.stderr  # a name and what it is
    applied = subprocess.run([cli, "preset", "team-recipe", "--repo", str(project)], capture_output=True, text=True,
                             timeout=300)
    assert applied.returncode == 0, applied.stderr
    assert yaml.safe_load((project / "params.yaml").read_text())["train"]["epochs"] == 3

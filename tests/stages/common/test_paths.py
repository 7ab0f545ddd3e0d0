import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.errors import ConfigError
from stages.common.paths import artifact_paths, evaluation_files, stage_paths
from tests.helpers import REPO


def test_stage_paths_come_from_the_command_line():
    assert stage_paths("evaluate", "model", "out", argv=["--model", "m.keras", "--out", "r"]) == \
        {"model": Path("m.keras"), "out": Path("r")}


def test_a_stage_run_without_its_paths_says_how_to_run_it():
    with pytest.raises(ConfigError, match=r"python -m stages.train: the following arguments are required: "
                                          r"--model; run it through `dvc repro`"):
        stage_paths("train", "prepared", "model", argv=["--prepared", "p"])
    run = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and run.stderr.startswith("error: python -m stages")


def test_dvc_yaml_is_the_one_home_of_every_artifact_path():
    declared = artifact_paths(REPO)
    assert {"raw", "prepared", "validate", "model", "train", "evaluate", "report"} <= set(declared)
    assert evaluation_files(REPO)["metrics"] == f"{declared['evaluate'].as_posix()}/metrics.json"
    code = [p for folder in ("stages", "pipelines", "benchmarks") for p in (REPO / folder).rglob("*.py")]
    for path in declared.values():
        spelled = [str(p.relative_to(REPO)) for p in code if path.as_posix() in p.read_text()]
        assert spelled == [], f"{path} is spelled out in {spelled}; read it from dvc.yaml instead"


def test_a_dvc_yaml_without_paths_is_named(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    with pytest.raises(ConfigError, match="declares no `vars: - paths:` mapping"):
        artifact_paths(tmp_path)

"""A sweep's trial as the stages see it: export and report are for models that trained to the end."""

import numpy as np
import pytest

from stages.common import dataio
from stages.common.trial import PRUNED_AT
from tests.helpers import run_stage

CLASSES = ["a", "b", "c"]


@pytest.mark.parametrize("stage", ["export", "report"])
def test_export_and_report_refuse_a_pruned_model_in_one_line(in_tmp, stage):
    dataio.write_json(in_tmp / "data/prepared/classes.json", CLASSES)
    dataio.save_split(in_tmp / "data/prepared/test.npz", np.zeros((3, 32, 32, 3), np.uint8), np.arange(3))
    dataio.write_json(in_tmp / "results/evaluate/metrics.json", {PRUNED_AT: 1, "split": "test"})
    result = run_stage(stage, in_tmp)
    assert result.returncode == 3 and result.stderr.strip().count("\n") == 0, result.stderr
    assert result.stderr.startswith("error: results/evaluate/metrics.json holds no evaluation: the model's training was "
                                    "pruned by its sweep after epoch 1; set train.trial: null"), result.stderr
    assert not (in_tmp / "models/export").exists() and not (in_tmp / "results/report").exists()

import numpy as np
import pandas as pd
import pytest

from stages.common.trial import PRUNED_AT
from stages.evaluate import evaluate
from tests.helpers import run_stage

CLASSES = ["a", "b", "c"]


def test_metrics_report_confusion_and_predictions_from_fixed_probabilities():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3]])
    result = evaluate(probs, labels, CLASSES)
    m = result["metrics"]
    assert m["accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    expected_loss = -np.mean(np.log(probs[np.arange(6), labels]))
    assert m["loss"] == pytest.approx(expected_loss, abs=1e-4)
    # per class F1: a = 2*0.5*0.5/1 = 0.5, b = 2*(2/3)*1/(5/3) = 0.8, c = 2*1*0.5/1.5 = 2/3
    assert m["f1_macro"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-4)
    assert result["confusion"].loc["a"].tolist() == [1, 1, 0]
    assert result["confusion"].loc["c"].tolist() == [1, 0, 1]
    assert result["report"]["b"]["recall"] == 1.0
    row = result["predictions"].iloc[1]
    assert (row["actual"], row["predicted"], row["probability"]) == ("a", "b", 0.7)
    assert "    a     0.5000" in result["report_text"]


def test_a_pruned_model_is_not_evaluated_and_its_files_say_so(in_tmp):
    """No model is loaded (there is none here): train's run_info says the sweep's pruner stopped it."""
    from stages.common import dataio

    dataio.write_json(in_tmp / "data/prepared/classes.json", CLASSES)
    dataio.write_json(in_tmp / "results/train/run_info.json", {PRUNED_AT: 2})
    result = run_stage("evaluate", in_tmp)
    assert result.returncode == 0, result.stderr
    out = in_tmp / "results/evaluate"
    assert dataio.read_json(out / "metrics.json") == {PRUNED_AT: 2, "split": "test"}
    assert dataio.read_json(out / "classification_report.json") == {}
    assert (out / "classification_report.txt").read_text().startswith("not evaluated: training was pruned after epoch 2")
    assert list(pd.read_csv(out / "confusion_matrix.csv", index_col=0).columns) == CLASSES
    predictions = pd.read_csv(out / "predictions.csv")
    assert predictions.empty and list(predictions.columns) == ["index", "actual", "predicted", "probability"]


"""evaluate: scikit-learn metrics of the trained model on the test (or validation) split.

Writes into its folder (dvc.yaml's paths.evaluate): metrics.json (DVC metrics), classification_report.{json,txt},
confusion_matrix.csv, and predictions.csv (index, actual, predicted, probability), which
dvc.yaml's confusion plot reads.

A model whose training a sweep's pruner stopped (train's run_info says after which epoch) is not
evaluated: a pruned point is never ranked, so its test figures would cost the sweep time and tell
nobody anything. Its files then say so: metrics.json holds where it was pruned and no figures,
the others hold no rows.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from stages.common import dataio
from stages.common.errors import DataError, run_main
from stages.common.params import load_section
from stages.common.paths import CLASSES, EVALUATION, RUN_INFO, split_file, stage_paths
from stages.common.schemas import EvaluateParams
from stages.common.trial import PRUNED_AT


def evaluate(probabilities: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    """Metrics, per-class report, confusion matrix and predictions from class probabilities."""
    k = len(classes)
    predicted = probabilities.argmax(axis=1)
    label_ids = list(range(k))
    report = skm.classification_report(
        labels, predicted, labels=label_ids, target_names=classes, digits=4, output_dict=True, zero_division=0
    )
    text = skm.classification_report(labels, predicted, labels=label_ids, target_names=classes, digits=4, zero_division=0)
    clipped = np.clip(probabilities, 1e-7, 1.0)
    metrics = {
        "loss": round(float(skm.log_loss(labels, clipped / clipped.sum(axis=1, keepdims=True), labels=label_ids)), 4),
        "accuracy": round(float(skm.accuracy_score(labels, predicted)), 4),
        "f1_macro": round(float(skm.f1_score(labels, predicted, average="macro", zero_division=0)), 4),
        "f1_weighted": round(float(skm.f1_score(labels, predicted, average="weighted", zero_division=0)), 4),
        "images": len(labels),
    }
    names = np.asarray(classes)
    predictions = pd.DataFrame(
        {
            "index": np.arange(len(labels)),
            "actual": names[labels],
            "predicted": names[predicted],
            "probability": probabilities[np.arange(len(labels)), predicted].round(4),
        }
    )
    confusion = pd.DataFrame(skm.confusion_matrix(labels, predicted, labels=label_ids), index=classes, columns=classes)
    return {"metrics": metrics, "report": report, "report_text": text, "confusion": confusion, "predictions": predictions}


def not_evaluated(classes: list[str], pruned_after: int) -> dict:
    """What evaluate records of a model its sweep's pruner stopped after epoch `pruned_after`: the
    same files as `evaluate`'s, with no figures in them."""
    return {"metrics": {PRUNED_AT: pruned_after}, "report": {},
            "report_text": f"not evaluated: training was pruned after epoch {pruned_after} by its sweep's pruner\n",
            "confusion": pd.DataFrame(columns=classes, dtype=int),
            "predictions": pd.DataFrame(columns=["index", "actual", "predicted", "probability"])}


def data_hash(images: np.ndarray, labels: np.ndarray) -> str:
    """Identifies the evaluated images and labels: two runs compare only on the same ones."""
    digest = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def main() -> None:
    paths = stage_paths("evaluate", "prepared", "model", "train", "out")
    prepared, model_path, out = paths["prepared"], paths["model"], paths["out"]
    params: EvaluateParams = load_section("evaluate")
    classes = dataio.read_json(prepared / CLASSES)
    if pruned_after := dataio.read_json(paths["train"] / RUN_INFO).get(PRUNED_AT):
        result = not_evaluated(classes, pruned_after)
        result["metrics"].update(split=params.split)
        write(out, result)
        print(f"evaluate: not evaluated, {model_path} is a partial run (pruned after epoch {pruned_after})")
        return
    images, labels = dataio.load_split(prepared / split_file(params.split))
    # Keras (and TensorFlow's native logging) only once params and data are known good: an error
    # before this point stays one line on stderr.
    from stages.common.inference import load_trained, predict_probabilities

    probabilities = predict_probabilities(load_trained(model_path), images, params.batch_size, params.tta_flip,
                                          params.tta_translate)
    if not np.all(np.isfinite(probabilities)):
        raise DataError(f"{model_path} produced non-finite probabilities; retrain it (dvc repro -f train)")
    result = evaluate(probabilities, labels, classes)
    # Which images the numbers are about: compare and the gate refuse to set a validation
    # figure against a test figure, or figures on different data.
    result["metrics"].update(split=params.split, data=data_hash(images, labels))
    write(out, result)
    print(f"evaluate ({params.split} split): {result['metrics']}")


def write(out: Path, result: dict) -> None:
    """`evaluate`'s or `not_evaluated`'s result as the stage's files, each whole or not at all."""
    dataio.write_json(out / EVALUATION["metrics"], result["metrics"])
    dataio.write_json(out / EVALUATION["report"], result["report"])
    dataio.write_text(out / "classification_report.txt", result["report_text"])
    with dataio.atomic_path(out / EVALUATION["confusion"]) as tmp:
        result["confusion"].to_csv(tmp)
    with dataio.atomic_path(out / EVALUATION["predictions"]) as tmp:
        result["predictions"].to_csv(tmp, index=False)


if __name__ == "__main__":
    run_main(main)

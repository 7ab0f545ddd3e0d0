"""export: the trained model as a TensorFlow SavedModel (TF Serving) and ONNX (ONNX Runtime), each
checked against Keras on the test split before it is written.

Writes the model folder (dvc.yaml's paths.exports, cached by DVC): saved_model/, model.onnx and
signature.json (input and the test split's colour statistics, classes, version = DVC's md5 of the Keras model, the code revision it was
exported with, the evaluation's metrics); and its results folder (paths.export): metrics.json, the check's figures.
Normalisation is inside the model, so every export takes raw 0..255 RGB pixels, NHWC.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from stages.common import dataio
from stages.common.colour import colour_statistics
from stages.common.errors import IntegrityError, run_main
from stages.common.params import load_section
from stages.common.paths import CLASSES, EVALUATION, EXPORT_METRICS, split_file, stage_paths
from stages.common.provenance import code_revision, file_md5
from stages.common.schemas import IMAGE_SHAPE, ExportParams
from stages.common.serving import EXPORTED, INPUT_NAME, OUTPUT_NAME, OnnxClassifier
from stages.common.trial import refuse_pruned_model


def agreement(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
    """How closely an export's probabilities follow the Keras model's on the same images, and with
    the images' labels the export's own accuracy (one view per image: what a server answers)."""
    figures = {
        "max_probability_diff": float(np.abs(reference - exported).max()),
        "top1_agreement": float((reference.argmax(axis=1) == exported.argmax(axis=1)).mean()),
    }
    if labels is not None:
        figures["accuracy"] = float((exported.argmax(axis=1) == labels).mean())
    return figures


def check_agreement(figures: dict[str, dict[str, float]], params: ExportParams) -> None:
    """Refuse any export whose predictions drift from the Keras model's beyond params.yaml's limits."""
    failed = [f"{fmt}: max probability difference {f['max_probability_diff']:.3g} (limit "
              f"{params.max_probability_diff}), top-1 agreement {f['top1_agreement']:.2%} (limit "
              f"{params.min_top1_agreement:.2%})"
              for fmt, f in figures.items()
              if f["max_probability_diff"] > params.max_probability_diff
              or f["top1_agreement"] < params.min_top1_agreement]
    if failed:
        raise IntegrityError(f"the export does not predict as the trained model does ({'; '.join(failed)}); "
                             "nothing was written: report it with the model, or raise export.max_probability_diff")


def inference_copy(model):
    """The model for serving: its normalisation folded into a Rescaling layer with the statistics as
    graph constants (tf2onnx turns the Normalization layer's captured tensors into extra inputs)."""
    import keras

    def swap(layer):
        if not isinstance(layer, keras.layers.Normalization):
            return layer
        mean = np.asarray(layer.mean, dtype=np.float64).reshape(-1)
        std = np.maximum(np.sqrt(np.asarray(layer.variance, dtype=np.float64).reshape(-1)), keras.backend.epsilon())
        return keras.layers.Rescaling(scale=(1 / std).tolist(), offset=(-mean / std).tolist(), name=layer.name)

    return keras.models.clone_model(model, clone_function=swap)


def serving_function(model):
    """`model(pixels, training=False)` as a traced function: Keras' own `model.export` traced this
    Keras release's reloaded models in training mode (batch statistics, augmentation on), which the
    check caught as a 0.86 probability difference."""
    import tensorflow as tf

    spec = [tf.TensorSpec((None, *IMAGE_SHAPE), tf.float32, name=INPUT_NAME)]
    return tf.function(lambda pixels: {OUTPUT_NAME: model(pixels, training=False)}, input_signature=spec), spec


def _erfc(ctx, node, name, args) -> None:
    """ONNX has Erf but no Erfc, which exact GELU uses: erfc(x) = 1 - erf(x)."""
    from tf2onnx import utils

    node.type = "Erf"
    one = ctx.make_const(utils.make_name("one"), np.array(1, dtype=np.float32))
    negated = ctx.insert_new_node_on_output("Neg", node.output[0], name=utils.make_name(node.name))
    shifted = ctx.insert_new_node_on_output("Add", negated.output[0], name=utils.make_name(node.name))
    ctx.replace_inputs(shifted, [negated.output[0], one.output[0]])


def write_onnx(model, path: Path, opset: int) -> None:
    import tf2onnx

    function, spec = serving_function(model)
    tf2onnx.convert.from_function(function, input_signature=spec, opset=opset,
                                  custom_op_handlers={"Erfc": (_erfc, [])}, output_path=str(path))


def write_saved_model(model, folder: Path) -> None:
    import keras

    function, _ = serving_function(model)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", function)
    archive.write_out(str(folder), verbose=False)


def saved_model_probabilities(folder: Path, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(folder))  # kept: `serve` alone would outlive its variables
    return np.concatenate([loaded.serve(pixels[i:i + batch_size])[OUTPUT_NAME].numpy()
                           for i in range(0, len(pixels), batch_size)])


def model_version(model_path: Path) -> dict[str, str]:
    """The code revision the export was made at and DVC's hash of the Keras model (a file's md5)."""
    # The commit that will hold this model is not known yet (the run is committed after it ends):
    # the version is the model's own hash, and code_rev says which code produced it. Which commit
    # holds an export is found when it is served (pipelines/api.py).
    rev, md5 = code_revision(), file_md5(model_path)
    return {"code_rev": rev, "model_md5": md5, "version": md5[:12]}


def export(model, pixels: np.ndarray, params: ExportParams, folder: Path,
           labels: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Write each format of `params.formats` into `folder` and return its agreement with `model`
    on `pixels` (raw 0..255), and its accuracy with `labels`; raises IntegrityError when one
    drifts beyond the limits."""
    from stages.common.inference import predictions

    pixels = pixels.astype(np.float32)
    reference = predictions(model, pixels, params.batch_size)
    served = inference_copy(model)
    figures = {}
    if "saved_model" in params.formats:
        write_saved_model(served, folder / EXPORTED["saved_model"])
        figures["saved_model"] = agreement(
            reference, saved_model_probabilities(folder / EXPORTED["saved_model"], pixels, params.batch_size), labels)
    if "onnx" in params.formats:
        write_onnx(served, folder / EXPORTED["onnx"], params.onnx_opset)
        onnx_model = OnnxClassifier(folder / EXPORTED["onnx"], [str(k) for k in range(reference.shape[1])])
        figures["onnx"] = agreement(reference, onnx_model.probabilities(pixels, params.batch_size), labels)
    check_agreement(figures, params)
    return figures


def signature(classes: list[str], params: ExportParams, version: dict[str, str], metrics: dict[str, Any],
              statistics: dict[str, Any], served_accuracy: float | None) -> dict:
    """What serves the model needs to know: its input and output, classes, version, the evaluation's
    metrics and the export's own test accuracy (one view per image: the evaluation may average
    several views, test-time augmentation, which a server does not), and the colour statistics of
    the test split (the API's drift monitor compares its inputs with them)."""
    return {
        "input": {"name": INPUT_NAME, "shape": [None, *IMAGE_SHAPE], "dtype": "float32",
                  "layout": "NHWC, RGB", "range": [0, 255], "statistics": {**statistics, "split": "test"}},
        "output": {"name": OUTPUT_NAME, "shape": [None, len(classes)], "dtype": "float32"},
        "classes": classes,
        "formats": {fmt: EXPORTED[fmt] for fmt in params.formats},
        "onnx_opset": params.onnx_opset if "onnx" in params.formats else None,
        **version,
        "metrics": metrics,
        "served": {"accuracy": served_accuracy, "split": "test", "views": 1},
    }


def main() -> None:
    paths = stage_paths("export", "prepared", "model", "evaluate", "exports", "out")
    params: ExportParams = load_section("export")
    classes = dataio.read_json(paths["prepared"] / CLASSES)
    images, labels = dataio.load_split(paths["prepared"] / split_file("test"))
    metrics = dataio.read_json(paths["evaluate"] / EVALUATION["metrics"])
    refuse_pruned_model(metrics, paths["evaluate"] / EVALUATION["metrics"])
    from stages.common.inference import load_trained

    model = load_trained(paths["model"])
    started = time.perf_counter()
    with dataio.atomic_dir(paths["exports"]) as tmp:
        figures = export(model, images, params, tmp, labels)
        served = figures.get("onnx", figures.get("saved_model", {})).get("accuracy")
        dataio.write_json(tmp / EXPORTED["signature"],
                          signature(classes, params, model_version(paths["model"]), metrics,
                                    colour_statistics(images), served))
    result = {**figures, "images": len(images), "seconds": round(time.perf_counter() - started, 1)}
    dataio.write_json(paths["out"] / EXPORT_METRICS, result)
    summary = ", ".join(f"{fmt} max diff {f['max_probability_diff']:.2g} top-1 {f['top1_agreement']:.2%} "
                        f"accuracy {f['accuracy']:.2%}" for fmt, f in figures.items())
    print(f"export: {summary} on {len(images):,} test images -> {paths['exports']}")


if __name__ == "__main__":
    run_main(main)

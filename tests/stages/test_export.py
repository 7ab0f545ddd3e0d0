"""The export stage: SavedModel and ONNX that predict as the Keras model does, on raw pixels."""

from __future__ import annotations

import numpy as np
import pytest

from stages.common.errors import ConfigError, IntegrityError
from stages.common.params import parse_section
from stages.common.schemas import ExportParams
from stages.common.serving import EXPORTED, OnnxClassifier
from stages.export import agreement, check_agreement, export
from tests.helpers import run_stage

PARAMS = {"formats": ["saved_model", "onnx"], "onnx_opset": 17, "max_probability_diff": 1e-4,
          "min_top1_agreement": 0.999, "batch_size": 16}


@pytest.fixture(scope="module")
def trained_model():
    """fast_vgg (exact GELU, BatchNorm) behind augmentation and a fitted normalisation, after a
    few steps of training so BatchNorm's moving statistics differ from its batch statistics."""
    from stages.common import layers, models

    # Both flips: the random one and (a custom layer with a variable) the alternating one.
    augment = [layers.AlternatingFlip(seed=1), *layers.augmentation(True, 4, 0.05, 0.0, 0.1, 0.0, seed=1)]
    model = models.build_model("fast_vgg", 4, [120.0, 110.0, 100.0], [60.0, 55.0, 50.0], {"widths": [8, 16]}, augment)
    model.compile("adam", "sparse_categorical_crossentropy")
    rng = np.random.default_rng(0)
    model.fit(rng.integers(0, 256, (64, 32, 32, 3)).astype(np.float32), rng.integers(0, 4, 64), epochs=1, verbose=0)
    return model


@pytest.mark.slow
def test_each_format_predicts_raw_pixels_as_the_keras_model(trained_model, tmp_path):
    import tensorflow as tf

    pixels = np.random.default_rng(1).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.random.default_rng(2).integers(0, 4, 40)
    figures = export(trained_model, pixels, parse_section(PARAMS, ExportParams, "export"), tmp_path, labels)
    assert set(figures) == {"saved_model", "onnx"}
    reference = trained_model.predict(pixels.astype(np.float32), verbose=0)
    for fmt in figures.values():
        assert fmt["max_probability_diff"] < 1e-5 and fmt["top1_agreement"] == 1.0
        # The export's own accuracy, one view per image, which a server answers with.
        assert fmt["accuracy"] == pytest.approx((reference.argmax(axis=1) == labels).mean())
    onnx = OnnxClassifier(tmp_path / EXPORTED["onnx"], ["a", "b", "c", "d"]).probabilities(pixels)
    np.testing.assert_allclose(onnx, reference, atol=1e-5)
    # TF Serving's view: the default signature takes `pixels` and returns `probabilities`.
    serving = tf.saved_model.load(str(tmp_path / EXPORTED["saved_model"])).signatures["serving_default"]
    served = serving(pixels=tf.constant(pixels, tf.float32))["probabilities"].numpy()
    np.testing.assert_allclose(served, reference, atol=1e-5)


def test_an_export_that_drifts_fails_with_its_figures():
    params = parse_section(PARAMS, ExportParams, "export")
    reference = np.array([[0.9, 0.1], [0.2, 0.8]])
    check_agreement({"onnx": agreement(reference, reference + 1e-6)}, params)  # within the limits
    with pytest.raises(IntegrityError, match=r"onnx: max probability difference 0\.7 .*top-1 agreement 50\.00%"):
        check_agreement({"onnx": agreement(reference, np.array([[0.2, 0.8], [0.2, 0.8]]))}, params)


@pytest.mark.parametrize("formats", [["tflite"], [], ["onnx", "onnx"]])
def test_formats_other_than_saved_model_and_onnx_are_config_errors(formats):
    with pytest.raises(ConfigError, match="export.formats"):
        parse_section({**PARAMS, "formats": formats}, ExportParams, "export")


@pytest.mark.slow
def test_the_stage_without_a_trained_model_is_one_line(in_tmp):
    from stages.common import dataio

    dataio.write_json(in_tmp / "data/prepared/classes.json", ["a", "b"])
    dataio.save_split(in_tmp / "data/prepared/test.npz", np.zeros((2, 32, 32, 3), np.uint8), np.array([0, 1]))
    dataio.write_json(in_tmp / "results/evaluate/metrics.json", {"accuracy": 0.5})
    result = run_stage("export", in_tmp)
    assert result.returncode == 3, result.stderr
    assert result.stderr.strip().splitlines()[-1] == ("error: models/model.keras not found; train first "
                                                     "(`cifar10-pipeline run` or `dvc repro train`)")
    assert not (in_tmp / "models/export").exists()

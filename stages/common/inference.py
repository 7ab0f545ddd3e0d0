"""A trained Keras model at inference time (evaluate, export, the benchmarks): loaded in float32,
predicting batch by batch, with airbench's test-time views."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from stages.common.errors import DataError
from stages.common.layers import all_layers  # importing the module registers the custom layers too


def predictions(model: keras.Model, pixels: np.ndarray, batch_size: int) -> np.ndarray:
    """The model's outputs, batch by batch. Not `model.predict`: on TensorFlow its tf.data
    pipeline held each call until the autotuner's next wake-up (stages.train.UNTUNED), seconds for
    every TTA view."""
    batches = [np.asarray(model.predict_on_batch(pixels[start:start + batch_size]), dtype=np.float64)
               for start in range(0, len(pixels), batch_size)]
    return np.concatenate(batches) if batches else np.zeros((0, model.output_shape[-1]))


def predict_probabilities(model: keras.Model, images: np.ndarray, batch_size: int, tta_flip: bool,
                          tta_translate: int = 0) -> np.ndarray:
    """Class probabilities, optionally averaged over test-time views (airbench's multi-crop TTA):
    with `tta_flip`, each image and its mirror image; with `tta_translate` t, half the weight on
    those and half on the same views shifted by t pixels diagonally both ways (edges reflected)."""
    pixels = images.astype(np.float32)

    def views(batch: np.ndarray) -> np.ndarray:
        out = predictions(model, batch, batch_size)
        if tta_flip:
            out = (out + predictions(model, batch[:, :, ::-1], batch_size)) / 2
        return out

    probabilities = views(pixels)
    if tta_translate:
        t = tta_translate
        padded = np.pad(pixels, ((0, 0), (t, t), (t, t), (0, 0)), mode="reflect")
        shifted = [padded[:, :32, :32], padded[:, 2 * t:2 * t + 32, 2 * t:2 * t + 32]]
        probabilities = (probabilities + sum(views(np.ascontiguousarray(v)) for v in shifted) / 2) / 2
    return probabilities


def load_trained(path: Path) -> keras.Model:
    """The trained model, for inference (evaluate, export): compile=False skips the optimizer and
    its custom learning-rate schedule, which predictions never need."""
    if not path.is_file():
        raise DataError(f"{path} not found; train first (`cifar10-pipeline run` or `dvc repro train`)")
    try:
        return in_float32(keras.models.load_model(path, compile=False))
    except (ValueError, OSError, TypeError) as err:
        raise DataError(f"{path} is not a loadable Keras model ({str(err).splitlines()[0]}); "
                        "retrain it (`dvc repro -f train`)") from None


def in_float32(model: keras.Model) -> keras.Model:
    """The model with every layer computing in float32. Mixed precision is a way to train faster;
    its weights are float32, and evaluation, exports (ONNX Runtime has no bfloat16 convolution
    on the CPU) and serving all compute in float32, so they agree with each other."""
    if all(layer.dtype_policy.name == "float32" for layer in all_layers(model)):
        return model

    def float32_layer(layer):
        policy = getattr(layer, "dtype_policy", None)  # a functional graph's operations have none
        if policy is None or policy.name == "float32":
            return layer  # shared with the loaded model, which is not used again
        return layer.__class__.from_config({**layer.get_config(), "dtype": "float32"})

    copy = keras.models.clone_model(model, recursive=True, clone_function=float32_layer)
    copy.set_weights(model.get_weights())
    return copy

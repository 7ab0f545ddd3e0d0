"""Predictions for image files with the trained model, which carries its own normalisation."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

INPUT_SIZE = (32, 32)


class PredictError(Exception):
    pass


def load_pixels(path: Path) -> np.ndarray:
    """Any size or mode -> (32, 32, 3) float pixels in 0..255, as the model was trained on."""
    if not path.is_file():
        raise PredictError(f"{path} not found; pass existing image files")
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
            if rgb.size != INPUT_SIZE:
                rgb = rgb.resize(INPUT_SIZE, Image.Resampling.BICUBIC)
            return np.asarray(rgb, dtype=np.float32)
    except (UnidentifiedImageError, OSError) as err:
        raise PredictError(f"{path} is not a readable image ({err})") from None


def predict_files(paths: list[Path], model_path: Path, classes_path: Path) -> Iterator[tuple[Path, str, float]]:
    for needed in (model_path, classes_path):
        if not needed.is_file():
            raise PredictError(f"{needed} not found; train first (`cifar10-pipeline run` or `dvc repro`) "
                               "or pass --model/--classes")
    batch = np.stack([load_pixels(p) for p in paths])
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    model = keras.models.load_model(model_path, compile=False)  # inference only: no optimizer needed
    names = json.loads(classes_path.read_text())
    probabilities = np.asarray(model.predict(batch, verbose=0))
    for path, row in zip(paths, probabilities):
        best = int(row.argmax())
        yield path, names[best], float(row[best])

"""The exported model at inference time: ONNX Runtime on raw 0..255 pixels, no TensorFlow.

One code path for every consumer of the export: the export stage's own check, `cifar10-pipeline
predict` and the inference API (`cifar10-pipeline api`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from stages.common import dataio
from stages.common.errors import DataError
from stages.common.schemas import IMAGE_SHAPE

# What the export stage writes into its model folder (dvc.yaml's paths.exports).
EXPORTED = {"saved_model": "saved_model", "onnx": "model.onnx", "signature": "signature.json"}
INPUT_NAME = "pixels"
OUTPUT_NAME = "probabilities"


class OnnxClassifier:
    """An ONNX model of the export's signature (pixels in, probabilities out), ready to predict."""

    def __init__(self, onnx_path: Path, classes: list[str], threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ONNX Runtime's own choice (one per core)
        try:
            self.session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - ONNX Runtime raises its own untyped errors
            raise DataError(f"{onnx_path} is not a loadable ONNX model ({str(err).splitlines()[0]}); "
                            "re-export it (`dvc repro -f export`)") from None
        self.classes = classes

    def probabilities(self, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, 32, 32, 3) pixels in 0..255 -> (N, classes) probabilities."""
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4 or pixels.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"expected images of shape (N, {', '.join(map(str, IMAGE_SHAPE))}), got {pixels.shape}")
        batches = [self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels[i:i + batch_size]})[0]
                   for i in range(0, len(pixels), batch_size)]
        return np.concatenate(batches) if batches else np.zeros((0, len(self.classes)), np.float32)


def load_exported(folder: Path, threads: int = 0) -> tuple[OnnxClassifier, dict[str, Any]]:
    """The export's ONNX model and its signature.json (classes, version, metrics)."""
    onnx_path, signature_path = folder / EXPORTED["onnx"], folder / EXPORTED["signature"]
    for path in (signature_path, onnx_path):
        if not path.is_file():
            raise DataError(f"{path} not found; export the model first (`cifar10-pipeline run` or "
                            "`dvc repro export`, with onnx in export.formats)")
    signature = dataio.read_json(signature_path)
    classes = signature.get("classes") if isinstance(signature, dict) else None
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{signature_path} has no 'classes' list of class names; re-export the model "
                        "(`dvc repro -f export`)")
    return OnnxClassifier(onnx_path, classes, threads), signature

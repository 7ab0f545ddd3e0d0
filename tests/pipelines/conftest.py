from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import BIN, prefect_server

CLASSES = ["airplane", "automobile", "bird", "cat"]  # the classes of the `exported` model


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """A real Prefect server on 127.0.0.1 (SQLite in a temporary PREFECT_HOME); yields its API URL."""
    with prefect_server(tmp_path_factory.mktemp("prefect_home")) as url:
        yield url


@pytest.fixture
def prefect_env(prefect_api, tmp_path):
    return {**os.environ, "PREFECT_API_URL": prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "PREFECT_HOME": str(tmp_path / "client_home")}


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> Path:
    """An export folder as the export stage writes it, from a small model fitted for a few epochs to
    tell the synthetic classes apart (tests.synthetic.make_images), so pages and clients can check
    that an image comes back as its class."""
    from stages import export as stage
    from stages.common import dataio, models
    from stages.common.colour import colour_statistics
    from stages.common.params import parse_section
    from stages.common.schemas import ExportParams
    from stages.common.serving import EXPORTED
    from tests.synthetic import make_images

    folder = tmp_path_factory.mktemp("export")
    params = parse_section({"formats": ["onnx"], "onnx_opset": 17, "max_probability_diff": 1e-4,
                            "min_top1_agreement": 0.999, "batch_size": 16}, ExportParams, "export")
    images, labels = make_images(40, CLASSES)
    model = models.build_model("bn_cnn", len(CLASSES), [120.0] * 3, [60.0] * 3, {})
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(images.astype(np.float32), labels, epochs=4, batch_size=32, verbose=0)
    stage.export(model, images[::10], params, folder)
    version = {"code_rev": "0" * 40, "model_md5": "f" * 32, "version": "0000000-ffffffff"}
    dataio.write_json(folder / EXPORTED["signature"],
                      stage.signature(CLASSES, params, version, {"accuracy": 0.5, "split": "test"},
                                      colour_statistics(images), None))
    return folder

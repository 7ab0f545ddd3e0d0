import numpy as np
import pytest

from stages.common.errors import TrainingDiverged
from stages.common.models import MODELS, build_model
from stages.train import TrainParams, make_dataset, train
from tests import synthetic

CLASSES = ["a", "b", "c"]


def splits():
    images, labels = synthetic.make_images(12, CLASSES, seed=3)
    return {"train": (images[::2], labels[::2]), "val": (images[1::2], labels[1::2])}


NORM = {"mean": [120.0, 110.0, 100.0], "std": [60.0, 60.0, 60.0]}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_builds_and_outputs_probabilities(name):
    model = build_model(name, len(CLASSES), NORM["mean"], NORM["std"])
    out = np.asarray(model.predict(np.full((2, 32, 32, 3), 128.0, np.float32), verbose=0))
    assert out.shape == (2, 3) and np.allclose(out.sum(axis=1), 1.0, atol=1e-5)
    assert model.layers[1].name == "normalize"


def test_normalization_is_inside_the_model():
    model = build_model("tutorial_cnn", 3, NORM["mean"], NORM["std"])
    normalize = model.get_layer("normalize")
    x = np.full((1, 32, 32, 3), [120.0, 110.0, 100.0], np.float32)
    assert np.allclose(np.asarray(normalize(x)), 0.0, atol=1e-5)


def test_dataset_yields_float_pixels_in_batches():
    images, labels = synthetic.make_images(3, CLASSES)
    x, y = next(iter(make_dataset(images, labels, 4, shuffle_seed=0)))
    assert x.dtype.name == "float32" and x.shape == (4, 32, 32, 3) and float(x.numpy().max()) > 1.0


def test_one_epoch_trains_and_is_seeded():
    params = TrainParams("tutorial_cnn", 1, 8, "adam", 0.001, seed=5, require_gpu=False)
    _, history = train(params, splits(), CLASSES, NORM)
    _, again = train(params, splits(), CLASSES, NORM)
    assert set(history) >= {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert history["loss"] == pytest.approx(again["loss"], rel=1e-4)


def test_huge_learning_rate_is_reported_as_divergence():
    params = TrainParams("tutorial_cnn", 3, 4, "sgd", 10.0, seed=0, require_gpu=False)
    with pytest.raises(TrainingDiverged, match="lower train.learning_rate"):
        train(params, splits(), CLASSES, NORM)

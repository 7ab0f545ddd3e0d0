import numpy as np
import pytest

from stages.common.errors import ConfigError
from stages.common.models import MODELS, augmentation, build_model, check_arch, check_builds
from stages.common.recipe import make_optimizer, make_schedule
from stages.common.schemas import Augment, TrainParams
from stages.train import train
from tests import synthetic

CLASSES = ["a", "b", "c"]


def splits():
    images, labels = synthetic.make_images(12, CLASSES, seed=3)
    return {"train": (images[::2], labels[::2]), "val": (images[1::2], labels[1::2])}


NORM = {"mean": [120.0, 110.0, 100.0], "std": [60.0, 60.0, 60.0]}
NO_AUGMENT = Augment(False, 0, 0.0, 0.0, 0.0, 0.0)


def params(**changes) -> TrainParams:
    base = {"model": "tutorial_cnn", "arch": {}, "epochs": 1, "batch_size": 8, "optimizer": "adam",
            "learning_rate": 0.001, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "schedule": "constant",
            "warmup_epochs": 0.0, "step_every": 10, "step_factor": 0.5, "label_smoothing": 0.0, "augment": NO_AUGMENT,
            "early_stopping": None, "ema": False, "mixed_precision": False, "xla": False, "distribute": "none", "seed": 5,
            "require_gpu": False}
    return TrainParams(**{**base, **changes})


SMALL_TRANSFER = {"base": "resnet50v2", "size": 32, "weights": None}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_zoo_model_builds_and_trains_one_step(name):
    options = SMALL_TRANSFER if name == "transfer" else {}
    model = build_model(name, len(CLASSES), NORM["mean"], NORM["std"], options)
    out = np.asarray(model.predict(np.full((2, 32, 32, 3), 128.0, np.float32), verbose=0))
    assert out.shape == (2, 3) and np.allclose(out.sum(axis=1), 1.0, atol=1e-5)
    if name != "transfer":  # keras.applications bring their own preprocessing
        assert model.layers[1].name == "normalize"
    p = params(model=name, arch={name: options}, batch_size=12)
    from stages.train import compiled_model

    before = [w.copy() for w in compiled_model(p, len(CLASSES), NORM, 1).get_weights()]
    trained, history = train(p, splits(), CLASSES, NORM)
    assert np.isfinite(history["loss"][0]) and len(history["loss"]) == 1
    # The step changed the weights (same seed: the same initial weights as `before`).
    after = trained.get_weights()
    assert any(not np.allclose(a, b) for a, b in zip(before, after) if a.shape == b.shape)


def _body_input(model):
    """What the builder's first layer sees: the output of augmentation and normalisation."""
    import keras

    preprocessing = ("normalize", "random_flip", "random_translation", "random_rotation", "random_zoom",
                     "random_contrast", "random_shear")
    first = next(layer for layer in model.layers[1:] if not layer.name.startswith(preprocessing))
    return keras.Model(model.input, first.input)


def test_augmentation_runs_on_raw_pixels_so_contrast_keeps_standardized_values():
    """RandomContrast clips to its value range: after standardisation that zeroed every below-mean pixel."""
    layers = augmentation(False, 0, 0.0, 0.0, 0.5, 0.0, seed=1, fill_value=110.0)
    model = build_model("tutorial_cnn", 3, NORM["mean"], NORM["std"], augment=layers)
    images = synthetic.make_images(4, CLASSES)[0].astype(np.float32)
    seen = np.asarray(_body_input(model)(images, training=True))
    assert seen.min() < -0.5, "below-mean pixels must stay negative after standardisation"
    assert np.allclose(np.asarray(_body_input(model)(images, training=False)),
                       (images - np.array(NORM["mean"])) / np.array(NORM["std"]), atol=1e-4)


def test_adamw_without_weight_decay_builds():
    optimizer = make_optimizer(params(optimizer="adamw", weight_decay=0.0), 10)
    assert type(optimizer).__name__ == "AdamW" and optimizer.weight_decay == 0.0


def test_arch_is_per_model_so_switching_models_carries_nothing_over():
    p = params(model="bn_cnn", arch={"fast_vgg": {"widths": [48, 96, 192]}})
    assert p.options == {}  # bn_cnn's defaults, not fast_vgg's widths
    with pytest.raises(ConfigError, match="'train.arch.fastvgg' names no model; did you mean 'fast_vgg'"):
        params(arch={"fastvgg": {}})


@pytest.mark.parametrize("model, options, fragment", [
    ("fast_vgg", {"widths": []}, "widths is empty"),
    ("tutorial_cnn", {"widths": [32, 64, 64, 64]}, "does not build a tutorial_cnn"),
    ("leaky_bn_cnn", {"widths": [32, 64], "dropouts": [0.2, 0.3, 0.4]}, "widths has 2 blocks but dropouts 3"),
    ("transfer", {"base": "vgg99"}, "base 'vgg99' is not one of resnet50v2"),
])
def test_options_that_do_not_build_are_one_line_config_errors(model, options, fragment):
    with pytest.raises(ConfigError, match=r"^params.yaml: train.arch." + model) as err:
        check_builds(model, options)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_a_warmup_longer_than_the_run_is_shortened_so_the_schedule_decays():
    p = params(epochs=1, schedule="onecycle", warmup_epochs=2.0, learning_rate=0.2)
    schedule = make_schedule(p, steps_per_epoch=100)
    lr = [float(schedule(step)) for step in (25, 50, 75, 99)]
    assert lr[1] == pytest.approx(0.2) and lr[0] < lr[1] and lr[3] < lr[2] < lr[1]
    assert p.warnings() == [("train.warmup_epochs 2 leaves no decay in 1 epoch(s) of onecycle; "
                            "warming up for 0.5 epochs instead (half the run)")]
    assert params(epochs=16, schedule="onecycle", warmup_epochs=2.0).warnings() == []


@pytest.mark.parametrize("base", ["efficientnetb0", "xception"])
def test_other_transfer_backbones_build(base):
    model = build_model("transfer", 3, NORM["mean"], NORM["std"], {"base": base, "size": 71, "weights": None})
    assert np.asarray(model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0)).shape == (1, 3)


def test_unknown_arch_option_is_a_config_error():
    with pytest.raises(ConfigError, match="'train.arch.resnet.depth' is not an option of resnet; its options: widths"):
        check_arch({"resnet": {"depth": 3}}, "resnet")
    with pytest.raises(ConfigError, match="'train.arch.resnet.depth' is not an option of resnet"):
        check_arch({"resnet": {"depth": 3}}, "fast_vgg")  # also when another model is trained


@pytest.mark.parametrize("schedule", ["step", "cosine", "onecycle", "plateau"])
def test_schedules_augmentation_and_training_switches_run(schedule):
    p = params(epochs=2, schedule=schedule, warmup_epochs=0.5, step_every=1, label_smoothing=0.1, ema=True,
               weight_decay=1e-4, optimizer="sgd", learning_rate=0.01, early_stopping=5,
               augment=Augment(True, 4, 0.05, 0.1, 0.1, 0.1), mixed_precision=schedule == "onecycle")
    _model, history = train(p, splits(), CLASSES, NORM)
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert len(history["epoch_seconds"]) == 2 and all(s > 0 for s in history["epoch_seconds"])
    import keras

    keras.mixed_precision.set_global_policy("float32")


def test_flip_tta_changes_predictions_only_as_intended():
    import keras

    from stages.evaluate import predict_probabilities

    images = synthetic.make_images(2, CLASSES)[0]
    # 1x1 convolutions and global pooling: the model cannot tell an image from its mirror image.
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 1, activation="relu")(inputs / 255.0))
    symmetric = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    assert np.allclose(predict_probabilities(symmetric, images, 8, tta_flip=True),
                       predict_probabilities(symmetric, images, 8, tta_flip=False), atol=1e-6)

    model = build_model("tutorial_cnn", 3, NORM["mean"], NORM["std"])
    plain = predict_probabilities(model, images, 8, tta_flip=False)
    mirrored = predict_probabilities(model, images[:, :, ::-1], 8, tta_flip=False)
    averaged = predict_probabilities(model, images, 8, tta_flip=True)
    assert np.allclose(averaged, (plain + mirrored) / 2, atol=1e-6) and not np.allclose(averaged, plain)


def test_an_interrupt_swallowed_inside_training_still_stops_it():
    """Keras/TensorFlow code has bare `except:` clauses; a Ctrl-C landing in one must not be lost."""
    import os
    import signal
    import time

    import keras

    class SwallowsAnInterrupt(keras.callbacks.Callback):
        epochs_begun = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epochs_begun += 1
            if epoch == 0:
                try:
                    os.kill(os.getpid(), signal.SIGINT)
                    time.sleep(0.2)  # the handler runs here
                except:  # noqa: E722, S110 - the pattern that swallowed it
                    pass

    spy = SwallowsAnInterrupt()
    # As at a terminal, whatever this test process inherited (a background job ignores SIGINT).
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train(params(epochs=3), splits(), CLASSES, NORM, [spy])
        assert spy.epochs_begun == 1
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after training
    finally:
        signal.signal(signal.SIGINT, inherited)


MIRRORED_SCRIPT = """
import json, sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from stages.train import compiled_model, distribution_strategy, make_dataset, train
from tests.stages.test_train import CLASSES, NORM, params
from tests import synthetic

images, labels = synthetic.make_images(40, CLASSES, seed=3)
data = {"train": (images[::2], labels[::2]), "val": (images[1::2], labels[1::2])}
out, start, step = {}, None, {}
for kind in ("none", "mirrored"):
    # One SGD step on one batch from the same weights: the replicas' gradients must average.
    p = params(distribute=kind, batch_size=16, optimizer="sgd", learning_rate=0.05, momentum=0.0)
    with distribution_strategy(kind).scope():
        m = compiled_model(p, len(CLASSES), NORM, 1)
    start = start or m.get_weights()
    m.set_weights(start)
    m.fit(make_dataset(images[:16], labels[:16], 16, None, len(CLASSES)), epochs=1, verbose=0)
    step[kind] = m.get_weights()

    p = params(distribute=kind, epochs=4, batch_size=16, ema=True)
    model, history = train(p, data, CLASSES, NORM, backup_dir=None)
    path = sys.argv[1] + f"/{kind}.keras"
    model.save(path)
    probs = model.predict(images[1::2], verbose=0)
    out[kind] = {"replicas": model.distribute_strategy.num_replicas_in_sync,
                 "val_accuracy": history["val_accuracy"][-1],
                 "reload_diff": float(np.abs(keras.saving.load_model(path).predict(images[1::2], verbose=0) - probs).max())}
out["step_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(step["none"], step["mirrored"]))
print("RESULT " + json.dumps(out))
"""


def test_mirrored_training_splits_each_batch_across_two_devices_and_saves_a_plain_model(tmp_path):
    """train.distribute: mirrored on two logical CPU devices (set before TensorFlow starts: a
    subprocess): two replicas in sync, one step the same update as on one device (gradients
    averaged, not summed), the saved model reloads to the same predictions, and it learns as the
    one-device run does on the same data."""
    import json
    import subprocess
    import sys

    from tests.helpers import ENV, REPO

    done = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, str(tmp_path)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert result["none"]["replicas"] == 1 and result["mirrored"]["replicas"] == 2
    assert result["step_diff"] < 1e-5
    for kind in ("none", "mirrored"):
        assert result[kind]["reload_diff"] < 1e-5
    assert result["mirrored"]["val_accuracy"] > 0.8
    assert abs(result["mirrored"]["val_accuracy"] - result["none"]["val_accuracy"]) <= 0.1

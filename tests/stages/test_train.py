import json
from pathlib import Path

import numpy as np
import optuna
import pytest

from stages.common.errors import ConfigError
from stages.common.layers import augmentation
from stages.common.models import MODELS, build_model, check_arch, check_builds
from stages.common.recipe import make_optimizer, make_schedule
from stages.common.schemas import Augment, TrainParams
from stages.common.trial import PRUNED_AT, study_journal
from stages.train import train
from tests import synthetic
from tests.helpers import dvc, git_dvc_project, run_stage, set_params, tiny_params

CLASSES = ["a", "b", "c"]


def splits():
    images, labels = synthetic.make_images(12, CLASSES, seed=3)
    return {"train": (images[::2], labels[::2]), "val": (images[1::2], labels[1::2])}


NORM = {"mean": [120.0, 110.0, 100.0], "std": [60.0, 60.0, 60.0]}
NO_AUGMENT = Augment(False, 0, 0.0, 0.0, 0.0, 0.0, "bilinear")


def params(**changes) -> TrainParams:
    base = {"model": "tutorial_cnn", "arch": {}, "epochs": 1, "batch_size": 8, "optimizer": "adam",
            "learning_rate": 0.001, "momentum": 0.9, "nesterov": True, "weight_decay": 0.0, "bias_lr_scale": 1.0, "schedule": "constant",
            "warmup_epochs": 0.0, "step_every": 10, "step_factor": 0.5, "label_smoothing": 0.0, "augment": NO_AUGMENT,
            "early_stopping": None, "ema": False, "lookahead": False, "mixed_precision": False, "xla": False, "distribute": "none", "seed": 5,
            "require_gpu": False}
    return TrainParams(**{**base, **changes})


SMALL_TRANSFER = {"base": "resnet50v2", "size": 32, "weights": None}


@pytest.mark.slow
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

    preprocessing = ("normalize", "random_flip", "alternating_flip", "random_translation", "random_rotation", "random_zoom",
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
    ("fast_vgg", {"activation": "gleu"}, "Could not interpret activation function identifier: gleu"),
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


def test_restarts_anneal_the_onecycle_rate_to_zero_at_each_and_rise_again():
    p = params(epochs=9, schedule="onecycle", warmup_epochs=3.0, learning_rate=0.6, restarts=[1, 3])
    schedule = make_schedule(p, steps_per_epoch=100)
    lr = np.array([float(schedule(step)) for step in range(900)])
    for start, end in ((0, 100), (100, 300), (300, 900)):
        cycle = lr[start:end]
        peak = start + (end - start) // 3  # each stretch warms up for the run's share, a third
        assert cycle.max() == pytest.approx(0.6, rel=0.02) and abs(int(cycle.argmax()) + start - peak) <= 1
        assert cycle[0] == 0.0 and cycle[-1] < 0.02 * 0.6  # annealed as the stretch's last epoch ends
    single = make_schedule(params(epochs=9, schedule="onecycle", warmup_epochs=3.0, learning_rate=0.6), 100)
    assert [float(single(s)) for s in (0, 150, 300, 600, 899)] == pytest.approx([0.0, 0.3, 0.6, 0.3, 0.001], abs=1e-6)


@pytest.mark.parametrize("changes, fragment", [
    ({"restarts": [3, 1]}, "'train.restarts' is [3, 1]; list epochs in increasing order, each between 1 and 8"),
    ({"restarts": [9]}, "between 1 and 8 (train.epochs is 9)"),
    ({"restarts": [0, 3]}, "between 1 and 8"),
    ({"restarts": [2], "schedule": "cosine"}, "restarts the onecycle schedule, not cosine"),
])
def test_restarts_outside_the_run_or_out_of_order_are_config_errors(changes, fragment):
    with pytest.raises(ConfigError, match="^params.yaml: 'train.restarts'") as err:
        params(**{"epochs": 9, "schedule": "onecycle", **changes})
    assert fragment in str(err.value)
    assert params(epochs=9, schedule="cosine", restarts=[]).restarts == []


@pytest.mark.slow
@pytest.mark.parametrize("base", ["efficientnetb0", "xception"])
def test_other_transfer_backbones_build(base):
    model = build_model("transfer", 3, NORM["mean"], NORM["std"], {"base": base, "size": 71, "weights": None})
    assert np.asarray(model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0)).shape == (1, 3)


def test_unknown_arch_option_is_a_config_error():
    with pytest.raises(ConfigError, match="'train.arch.resnet.depth' is not an option of resnet; its options: widths"):
        check_arch({"resnet": {"depth": 3}}, "resnet")
    with pytest.raises(ConfigError, match="'train.arch.resnet.depth' is not an option of resnet"):
        check_arch({"resnet": {"depth": 3}}, "fast_vgg")  # also when another model is trained


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["step", "cosine", "onecycle", "plateau"])
def test_schedules_augmentation_and_training_switches_run(schedule):
    p = params(epochs=2, schedule=schedule, warmup_epochs=0.5, step_every=1, label_smoothing=0.1, ema=True, lookahead=True,
               weight_decay=1e-4, optimizer="sgd", learning_rate=0.01, early_stopping=5,
               augment=Augment(True, 4, 0.05, 0.1, 0.1, 0.1, "nearest"), mixed_precision=schedule == "onecycle",
               restarts=[1] if schedule == "onecycle" else None)
    _model, history = train(p, splits(), CLASSES, NORM)
    assert len(history["loss"]) == 2 and all(np.isfinite(history["loss"]))
    assert len(history["epoch_seconds"]) == 2 and all(s > 0 for s in history["epoch_seconds"])
    import keras

    keras.mixed_precision.set_global_policy("float32")


def test_flip_tta_changes_predictions_only_as_intended():
    import keras

    from stages.common.inference import predict_probabilities

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


def test_predictions_go_batch_by_batch_and_match_keras_predict_on_a_partial_batch_and_on_none():
    from stages.common.inference import predictions

    images = synthetic.make_images(7, CLASSES)[0].astype(np.float32)
    model = build_model("tutorial_cnn", 3, NORM["mean"], NORM["std"])
    assert np.allclose(predictions(model, images, 5), model.predict(images, batch_size=5, verbose=0), atol=1e-6)
    assert predictions(model, images[:0], 5).shape == (0, 3)


def test_the_training_input_runs_without_tf_data_autotuning():
    # Dropping an autotuned iterator waits for the tuner's next wake-up, 30 s of an 80 s epoch
    # (stages.train.UNTUNED); the pipeline's batches are the same without it.
    from stages.train import make_dataset

    images, labels = splits()["train"]
    ds = make_dataset(images, labels, 4, shuffle_seed=None, num_classes=3)
    assert ds.options().autotune.enabled is False
    x, y = next(iter(ds))
    assert x.dtype.name == "float32" and np.array_equal(x.numpy(), images[:4]) and y.numpy().argmax(1).tolist() == labels[:4].tolist()


def test_translated_tta_views_are_the_image_shifted_diagonally_with_half_the_weight():
    import keras

    from stages.common.inference import predict_probabilities

    images = synthetic.make_images(2, CLASSES)[0].astype(np.float32)
    # A model that sees one pixel, (10, 10): a view shifted by one pixel shows it (9, 9) or (11, 11).
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Flatten()(keras.layers.Cropping2D(((10, 21), (10, 21)))(inputs / 255.0))
    one_pixel = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))

    def seeing(row_col):
        moved = images.copy()
        moved[:, 10, 10] = images[:, row_col, row_col]
        return predict_probabilities(one_pixel, moved, 8, tta_flip=False)

    expected = 0.5 * seeing(10) + 0.25 * seeing(9) + 0.25 * seeing(11)
    assert np.allclose(predict_probabilities(one_pixel, images, 8, tta_flip=False, tta_translate=1), expected,
                       atol=1e-6)
    assert not np.allclose(expected, seeing(10))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_whitening_stem_whitens_the_training_patches_and_stays_frozen(tmp_path):
    import keras

    from stages.common.inference import load_trained
    from stages.common.layers import WHITEN_LAYER, fit_whitening

    images = splits()["train"][0]
    p = params(model="fast_vgg", arch={"fast_vgg": {"widths": [8, 16], "whiten": True, "identity_init": True,
                                                  "bn_scale": False, "bn_momentum": 0.4}}, batch_size=6)
    model, _history = train(p, splits(), CLASSES, NORM)
    whiten = model.get_layer(WHITEN_LAYER)
    fitted = keras.ops.convert_to_numpy(whiten.kernel).copy()
    assert not whiten.trainable and fitted.shape == (2, 2, 3, 24)
    # Training left the kernel as fitted: refitting on the same images gives the same one.
    assert fit_whitening(model, images, NORM["mean"], NORM["std"])
    assert np.allclose(keras.ops.convert_to_numpy(whiten.kernel), fitted, atol=1e-5)

    fit_whitening(model, images, NORM["mean"], NORM["std"], eps=1e-12)
    normalized = keras.Model(model.input, model.get_layer("normalize").output).predict(images.astype(np.float32), verbose=0)
    out = keras.ops.convert_to_numpy(whiten(normalized)).reshape(-1, 24)
    assert np.allclose(np.cov(out[:, :12], rowvar=False), np.eye(12), atol=1e-3)  # whitened
    assert np.allclose(out[:, 12:], -out[:, :12], atol=1e-4)

    model.save(tmp_path / "model.keras")
    again = load_trained(tmp_path / "model.keras")
    pixels = images[:4].astype(np.float32)
    assert np.allclose(again.predict(pixels, verbose=0), model.predict(pixels, verbose=0), atol=1e-6)


def test_identity_init_passes_each_input_channel_through_its_own_filter():
    import keras

    from stages.common.layers import PartialIdentity

    x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)
    conv = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, kernel_initializer=PartialIdentity())
    out = keras.ops.convert_to_numpy(conv(x))
    assert np.allclose(out[..., :4], x, atol=1e-6) and not np.allclose(out[..., 4:], 0)
    narrowing = keras.layers.Conv2D(2, 3, padding="same", use_bias=False, kernel_initializer=PartialIdentity())
    assert np.allclose(keras.ops.convert_to_numpy(narrowing(x)), x[..., :2], atol=1e-6)


@pytest.mark.parametrize(("setting", "gpu", "isa", "policy"), [
    ("auto", False, ["avx2"], "float32"),
    ("auto", False, ["avx2", "avx512f"], "float32"),
    ("auto", False, ["avx2", "avx512f", "avx512_bf16"], "mixed_bfloat16"),
    ("auto", False, ["avx2", "amx_bf16"], "mixed_bfloat16"),
    ("auto", True, [], "mixed_float16"),
    (True, False, ["avx2"], "mixed_bfloat16"),
    (False, True, ["avx512_bf16"], "float32"),
])
def test_mixed_precision_auto_uses_bfloat16_only_where_the_cpu_computes_it(setting, gpu, isa, policy):
    from stages.common.recipe import precision_policy

    assert precision_policy(setting, gpu, isa) == policy


@pytest.mark.parametrize(("cap", "policy"), [(None, "mixed_bfloat16"), ("", "mixed_bfloat16"),
                                             ("avx512_core_amx", "mixed_bfloat16"), ("AVX2", "float32"),
                                             ("AVX512_CORE", "float32")])
def test_auto_precision_follows_a_onednn_isa_cap(cap, policy):
    """ONEDNN_MAX_CPU_ISA=AVX2 on an AMX machine: auto chose bfloat16, whose oneDNN kernels the cap
    removes, and training failed with "could not create a primitive descriptor"."""
    from stages.common.recipe import precision_policy

    assert precision_policy("auto", False, ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], cap) == policy
    if policy == "float32":  # asked for outright: one line with the fix, not TensorFlow's AbortedError
        with pytest.raises(ConfigError, match=f"ONEDNN_MAX_CPU_ISA={cap} leaves oneDNN no bfloat16 kernels; unset"):
            precision_policy(True, False, ["avx2", "amx_bf16"], cap)


@pytest.mark.slow
@pytest.mark.parametrize(("model", "options"), [("fast_vgg", {"widths": [8, 16]}), ("transfer", SMALL_TRANSFER)])
def test_cpu_bfloat16_computes_in_the_matmul_layers_only_and_loads_back_in_float32(tmp_path, model, options):
    import keras

    from stages.common.inference import load_trained
    from stages.common.layers import all_layers
    from stages.common.recipe import compile_model

    p = params(model=model, arch={model: options}, batch_size=6)
    model = compile_model(p, len(CLASSES), NORM, 1, precision="mixed_bfloat16")
    policies = {(type(layer).__name__, layer.dtype_policy.name) for layer in all_layers(model)}
    assert keras.mixed_precision.global_policy().name == "float32"
    assert {kind for kind, policy in policies if policy == "mixed_bfloat16"} == {"Conv2D", "Dense"}
    assert ("BatchNormalization", "float32") in policies and ("Activation", "float32") in policies
    images, labels = splits()["train"]
    pixels = images.astype(np.float32)
    model.fit(pixels, np.eye(len(CLASSES))[labels], epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")

    served = load_trained(tmp_path / "model.keras")
    assert {layer.dtype_policy.name for layer in all_layers(served)} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(served.get_weights(), model.get_weights()))
    # The same weights; the outputs differ by bfloat16's rounding (an 8-bit mantissa) alone.
    difference = np.abs(served.predict(pixels, verbose=0) - model.predict(pixels, verbose=0)).max()
    assert 0 < difference < 0.02


def test_cpu_info_reads_the_model_and_the_isa_flags_that_matter(tmp_path):
    from stages.common.provenance import cpu_info

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n")
    assert cpu_info(cpuinfo) == {"model": "AMD EPYC 9R14", "isa": ["avx2", "avx512f", "avx512_bf16"]}
    assert cpu_info(tmp_path / "absent") == {"model": "unknown", "isa": []}


def test_mixed_precision_takes_auto_and_refuses_other_words():
    from stages.common.params import parse_section

    raw = {**{k: v for k, v in vars(params()).items() if k != "augment"}, "augment": vars(NO_AUGMENT)}
    assert parse_section({**raw, "mixed_precision": "auto"}, TrainParams, "train").mixed_precision == "auto"
    with pytest.raises(ConfigError, match="'train.mixed_precision' is 'bf16'; allowed values: False, True, auto"):
        parse_section({**raw, "mixed_precision": "bf16"}, TrainParams, "train")


def test_lookahead_pulls_the_weights_toward_a_slow_copy_on_airbench_s_ramp():
    import keras

    from stages.common.callbacks import Lookahead

    # One weight, a constant gradient: plain SGD moves it by lr each step, so the lookahead's
    # effect can be followed by hand.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss=lambda y, p: keras.ops.mean(p))
    x, y = np.ones((20, 1), np.float32), np.zeros((20, 1), np.float32)
    model.fit(x, y, batch_size=1, epochs=1, shuffle=False, verbose=0, callbacks=[Lookahead(total_steps=20)])

    slow = 1.0
    for step in (5, 10, 15, 20):
        fast = slow - 5 * 0.1
        weight = 0.95**5 * (step / 20) ** 3
        slow = weight * slow + (1 - weight) * fast
    assert float(model.get_weights()[0][0, 0]) == pytest.approx(slow, abs=1e-5)
    assert slow > 1.0 - 20 * 0.1 + 0.1  # it held the weight back, as plain SGD would not


def test_bias_lr_scale_multiplies_the_step_of_batchnorm_offsets_only():
    import keras

    # A constant gradient of 1 for every variable: plain SGD moves each by lr, the offsets by lr x 8;
    # decoupled weight decay shrinks all alike. The optimizer's config keeps its scale.
    p = params(optimizer="sgd", momentum=0.0, learning_rate=0.1, weight_decay=0.5, bias_lr_scale=8.0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, use_bias=False, kernel_initializer="ones"),
                              keras.layers.BatchNormalization(scale=False, beta_initializer="ones")])
    model.compile(optimizer=make_optimizer(p, 1), loss=lambda y, out: keras.ops.sum(model.trainable_variables[0])
                  + keras.ops.sum(model.trainable_variables[1]) + 0.0 * keras.ops.sum(out))
    model.fit(np.ones((1, 2), np.float32), np.zeros((1, 2), np.float32), batch_size=1, epochs=1, verbose=0)
    kernel, beta = (np.asarray(v.value) for v in model.trainable_variables)
    decay = 1 - 0.5 * 0.1
    assert np.allclose(kernel, decay * 1.0 - 0.1) and np.allclose(beta, decay * 1.0 - 0.8)
    saved = keras.saving.serialize_keras_object(model.optimizer)
    assert keras.saving.deserialize_keras_object(saved).bias_lr_scale == 8.0
    assert type(make_optimizer(params(optimizer="sgd"), 1)).__name__ == "SGD"  # 1: Keras' own


def test_bias_lr_scale_with_another_optimizer_warns_that_it_is_ignored():
    assert params(optimizer="adam", bias_lr_scale=64.0).warnings() == [
        "train.bias_lr_scale 64 applies to sgd only; adam ignores it (set it to 1 to silence this)"]
    assert params(optimizer="sgd", bias_lr_scale=64.0).warnings() == []


def test_logit_scale_divides_the_logits_before_softmax():
    import keras

    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype(np.float32)
    plain, scaled = (build_model("fast_vgg", 3, NORM["mean"], NORM["std"], {"widths": [8, 8, 8], "logit_scale": s})
                     for s in (1.0, 1 / 9))
    scaled.set_weights(plain.get_weights())
    logits = keras.Model(plain.input, plain.get_layer("probabilities").input)(x)
    expected = np.asarray(keras.ops.softmax(np.asarray(logits) / 9))
    assert np.allclose(scaled.predict(x, verbose=0), expected, atol=1e-6)


def test_fast_vgg_takes_its_activation_by_name():
    import keras

    def activations(options):
        model = build_model("fast_vgg", 3, NORM["mean"], NORM["std"], {"widths": [8, 8], **options})
        return {layer.activation.__name__ for layer in model.layers
                if isinstance(layer, keras.layers.Activation) and layer.name != "probabilities"}

    assert activations({}) == {"gelu"} and activations({"activation": "relu"}) == {"relu"}


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_nearest_crops_shift_by_whole_pixels_and_bilinear_ones_blend_them(interpolation):
    image = np.random.default_rng(1).permutation(32 * 32 * 3).reshape(1, 32, 32, 3).astype(np.float32)
    layers = augmentation(False, 2, 0.0, 0.0, 0.0, 0.0, seed=3, fill_value=-1.0, crop_interpolation=interpolation)
    shifted = [np.asarray(layers[0](image, training=True)) for _ in range(8)]
    whole = [set(np.unique(s)) <= set(np.unique(image)) | {-1.0} for s in shifted]
    assert all(whole) if interpolation == "nearest" else not any(whole)
    assert any(not np.array_equal(s, image) for s in shifted)


def test_alternating_flips_mirror_each_image_in_every_other_epoch_and_none_at_inference():
    from stages.common.layers import AlternatingFlip

    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3)).astype(np.float32)

    def mirrored(layer, epoch):
        layer.epoch.assign(epoch)
        seen = np.asarray(layer(images, training=True))
        flags = np.array([np.array_equal(s, i[:, ::-1]) for s, i in zip(seen, images)])
        assert all(np.array_equal(s, i) for s, i, f in zip(seen, images, flags) if not f)  # the rest untouched
        return flags

    layer = AlternatingFlip(seed=3)
    first, second, third = (mirrored(layer, epoch) for epoch in (0, 1, 2))
    assert 16 < first.sum() < 48  # about half of the images start mirrored
    assert np.array_equal(second, ~first) and np.array_equal(third, first)
    assert not np.array_equal(mirrored(AlternatingFlip(seed=4), 0), first)  # the seed picks which half
    assert np.array_equal(np.asarray(layer(images, training=False)), images)


@pytest.mark.slow
def test_training_with_alternating_flips_counts_its_epochs_and_loads_back(tmp_path):
    from stages.common.inference import load_trained
    from stages.common.layers import AlternatingFlip, all_layers

    p = params(epochs=3, augment=Augment("alternating", 2, 0.0, 0.0, 0.0, 0.0, "nearest"))
    model, history = train(p, splits(), CLASSES, NORM)
    flips = [layer for layer in all_layers(model) if isinstance(layer, AlternatingFlip)]
    assert len(flips) == 1 and int(flips[0].epoch.numpy()) == 2 and len(history["loss"]) == 3
    model.save(tmp_path / "model.keras")
    pixels = splits()["val"][0].astype(np.float32)
    again = load_trained(tmp_path / "model.keras")
    assert np.allclose(again.predict(pixels, verbose=0), model.predict(pixels, verbose=0), atol=1e-6)


def test_flip_takes_true_false_or_alternating_and_refuses_other_words():
    from stages.common.params import parse_section

    raw = {**{k: v for k, v in vars(params()).items() if k != "augment"}, "augment": vars(NO_AUGMENT)}
    for flip in (True, False, "alternating"):
        assert parse_section({**raw, "augment": {**raw["augment"], "flip": flip}}, TrainParams, "train").augment.flip == flip
    with pytest.raises(ConfigError, match="'train.augment.flip' is 'sometimes'; allowed values: False, True, alternating"):
        parse_section({**raw, "augment": {**raw["augment"], "flip": "sometimes"}}, TrainParams, "train")


def pruning_study(repo: Path, name: str) -> optuna.Study:
    """A sweep's study as `cifar10-pipeline sweep` keeps it, pruning with the median rule after one
    finished trial; that trial reported 2.0 (above any accuracy) after every epoch."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    journal = study_journal(repo, name)
    journal.parent.mkdir(exist_ok=True)
    study = optuna.create_study(study_name=name, direction="maximize",
                                storage=JournalStorage(JournalFileBackend(str(journal))))
    study.set_user_attr("search", {"pruner": {"median": {"n_startup_trials": 1}}})
    leader = study.ask()
    for step in (1, 2, 3):
        leader.report(2.0, step)
    study.tell(leader, 2.0)
    return study


@pytest.mark.e2e
def test_a_sweeps_trial_hears_each_epoch_and_its_pruner_stops_training(tmp_path, tiny_archive):
    """With train.trial set, train reports val_accuracy after each epoch and stops when the
    study's pruner prunes it, recording where as a successful run; a trial that has ended is not
    reported to; a bad trial is one line, exit 2."""
    repo = git_dvc_project(tmp_path / "project")
    set_params(repo / "params.yaml", **tiny_params(tiny_archive))
    dvc(repo, "repro", "validate")
    study = pruning_study(repo, "s")
    trial = study.ask()
    set_params(repo / "params.yaml", train={"epochs": 3, "trial": f"s/{trial.number}"})
    ran = dvc(repo, "repro", "train")
    assert f"trial s/{trial.number} pruned by its sweep's pruner after epoch 1 of 3" in ran.stdout, ran.stdout
    info = json.loads((repo / "results/train/run_info.json").read_text())
    metrics = json.loads((repo / "results/train/metrics.json").read_text())
    assert info[PRUNED_AT] == 1 and metrics[PRUNED_AT] == 1
    reported = study.trials[trial.number]
    assert reported.user_attrs[PRUNED_AT] == 1 and list(reported.intermediate_values) == [1]
    assert reported.intermediate_values[1] == pytest.approx(metrics["eval"]["accuracy"])
    curve = (repo / "results/train/plots/metrics/eval/accuracy.tsv").read_text().splitlines()
    assert len(curve) == 2  # the header and the one epoch it ran: the curve is cut short

    study.tell(trial.number, state=optuna.trial.TrialState.PRUNED)  # the sweep's part
    set_params(repo / "params.yaml", train={"epochs": 2})
    ended = dvc(repo, "repro", "train")
    assert f"trial s/{trial.number} has ended; training to the end without reporting to it" in ended.stdout
    assert PRUNED_AT not in json.loads((repo / "results/train/run_info.json").read_text())
    assert len((repo / "results/train/plots/metrics/eval/accuracy.tsv").read_text().splitlines()) == 3

    for ref, message in [("s", "train.trial 's' is not STUDY/NUMBER"), ("t/0", "train.trial names study 't', but its journal comparisons/t.journal does not exist"),
                         ("s/9", "train.trial: study 's' has no trial 9")]:
        set_params(repo / "params.yaml", train={"trial": ref})
        bad = run_stage("train", repo)
        assert bad.returncode == 2 and bad.stderr.startswith(f"error: {message}"), bad.stderr[-2000:]
        assert bad.stderr.count("\n") == 1

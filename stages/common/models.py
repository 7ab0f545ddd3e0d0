"""The model zoo: each architecture is one small builder, picked by name from `train.model`.

Every model takes raw pixel values (float, 0..255), starts with the training-only augmentation
layers (on raw pixels, where their clipping to 0..255 is right), then the normalisation that
prepare fitted on the training split (so evaluation and `predict` cannot forget it), then the
builder's body. Builders return logits and take their options as keyword arguments, which
`train.arch.<model>` sets; `build_model` adds the softmax.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from keras import layers, regularizers

from stages.common.errors import ConfigError, native_stderr_silenced
from stages.common.layers import WHITEN_LAYER, WHITEN_PATCH, PartialIdentity
from stages.common.schemas import IMAGE_SHAPE, MODEL_NAMES, TrainParams
from stages.common.serving import INPUT_NAME, OUTPUT_NAME

Builder = Callable[..., keras.KerasTensor]


def tutorial_cnn(x, num_classes: int, widths: tuple[int, ...] = (32, 64, 64), dense: int = 64,
                 pool: int = 2, activation: str = "relu"):
    """TensorFlow's CNN tutorial (seed 003) and its variants: valid convs, pooling between, one Dense."""
    for i, width in enumerate(widths):
        x = layers.Conv2D(width, 3, activation=activation)(x)
        if i < len(widths) - 1:
            x = layers.MaxPooling2D(pool)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(dense, activation=activation)(x)
    return layers.Dense(num_classes)(x)


def leaky_bn_cnn(x, num_classes: int, widths: tuple[int, ...] = (32, 64, 128),
                 dropouts: tuple[float, ...] = (0.2, 0.3, 0.4), dense: int = 512):
    """Seed 001: double-conv LeakyReLU/BatchNorm blocks (32-64-128), Dense 512; ~1.3M parameters."""
    if len(widths) != len(dropouts):
        raise ValueError(f"widths has {len(widths)} blocks but dropouts {len(dropouts)}; give one dropout per block")
    for width, dropout in zip(widths, dropouts):
        for _ in range(2):
            x = layers.Conv2D(width, 3, padding="same")(x)
            x = layers.LeakyReLU(negative_slope=0.1)(x)
            x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(dense)(x)
    x = layers.LeakyReLU(negative_slope=0.1)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dropout(0.4)(x)
    return layers.Dense(num_classes)(x)


def vgg_blocks(x, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256), dropout: float = 0.15,
               dense: int = 128, dense_dropout: float = 0.35):
    """Seed 000: VGG blocks (two BN convs + pool + dropout each), Dense 128 head."""
    for width in widths:
        for _ in range(2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(dense, activation="relu")(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dropout(dense_dropout)(x)
    return layers.Dense(num_classes)(x)


def bn_cnn(x, num_classes: int, widths: tuple[int, ...] = (64, 128, 96), dense: int = 128,
           l2: float = 0.0, dropout: float = 0.0):
    """Seed 002: BatchNorm CNN (the tuned 64/128/96 + Dense 128); `l2`/`dropout` give its variant."""
    reg = regularizers.L2(l2) if l2 else None
    for width in widths:
        x = layers.Conv2D(width, 3, activation="relu", kernel_regularizer=reg)(x)
        x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2)(x) if x.shape[1] >= 4 else x
        x = layers.Dropout(dropout)(x) if dropout else x
    x = layers.Flatten()(x)
    x = layers.Dense(dense, activation="relu", kernel_regularizer=reg)(x)
    x = layers.Dropout(dropout)(x) if dropout else x
    return layers.Dense(num_classes)(x)


def gap_cnn(x, num_classes: int, widths: tuple[int, ...] = (64, 128, 256), convs_per_block: int = 3,
            weight_decay: float = 5e-4):
    """Seed 004's direction: deeper BN blocks, global average pooling head, weight decay."""
    reg = regularizers.L2(weight_decay) if weight_decay else None
    for i, width in enumerate(widths):
        for _ in range(convs_per_block):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False, kernel_regularizer=reg)(x)
            x = layers.BatchNormalization()(x)
            x = layers.Activation("relu")(x)
        if i < len(widths) - 1:
            x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dense(num_classes, kernel_regularizer=reg)(x)


def _residual(x, width: int, stride: int):
    shortcut = x
    y = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False)(x)
    y = layers.BatchNormalization()(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(width, 3, padding="same", use_bias=False)(y)
    y = layers.BatchNormalization()(y)
    if stride != 1 or shortcut.shape[-1] != width:
        shortcut = layers.Conv2D(width, 1, strides=stride, use_bias=False)(shortcut)
        shortcut = layers.BatchNormalization()(shortcut)
    return layers.Activation("relu")(layers.Add()([y, shortcut]))


def resnet(x, num_classes: int, widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 3):
    """A CIFAR ResNet (He et al.): 3 stages of basic blocks; the defaults make ResNet-20."""
    x = layers.Conv2D(widths[0], 3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Activation("relu")(x)
    for stage, width in enumerate(widths):
        for block in range(blocks_per_stage):
            x = _residual(x, width, 2 if stage > 0 and block == 0 else 1)
    x = layers.GlobalAveragePooling2D()(x)
    return layers.Dense(num_classes)(x)


def fast_vgg(x, num_classes: int, widths: tuple[int, ...] = (48, 96, 192), dropout: float = 0.0,
             whiten: bool = False, identity_init: bool = False, bn_scale: bool = True, bn_momentum: float = 0.99,
             logit_scale: float = 1.0, activation: str = "gelu"):
    """The CPU-fast default: airbench-style blocks (conv-pool-BN-GELU-conv-BN-GELU), a stem, GAP head.

    airbench's ingredients as options: `whiten` makes the stem a frozen 2x2 patch-whitening
    convolution (its kernel fitted to the training images by `fit_whitening`); `identity_init`
    starts the block convolutions as identities (PartialIdentity); `bn_scale: false` and a short
    `bn_momentum` (Keras' convention, the old statistics' weight: airbench's 0.6, which it hands
    PyTorch as 1 - 0.6); `logit_scale` multiplies the logits by a constant (airbench: 1/9), which
    slows the head's learning against the label-smoothed targets. `activation` is any Keras
    activation's name (airbench: GELU).
    """
    def norm(y):
        return layers.BatchNormalization(momentum=bn_momentum, scale=bn_scale)(y)

    kernels = {"kernel_initializer": PartialIdentity()} if identity_init else {}
    if whiten:
        patch_values = WHITEN_PATCH * WHITEN_PATCH * IMAGE_SHAPE[-1]  # a filter per eigenvector, and its negative
        x = layers.Conv2D(2 * patch_values, WHITEN_PATCH, use_bias=False, trainable=False, name=WHITEN_LAYER)(x)
    else:
        x = layers.Conv2D(widths[0] // 2, 2, padding="same", use_bias=False)(x)
    x = layers.Activation(activation)(norm(x))
    for width in widths:
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, **kernels)(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Activation(activation)(norm(x))
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, **kernels)(x)
        x = layers.Activation(activation)(norm(x))
        x = layers.Dropout(dropout)(x) if dropout else x
    x = layers.GlobalMaxPooling2D()(x)
    x = layers.Dense(num_classes, use_bias=False)(x)
    return layers.Rescaling(logit_scale)(x) if logit_scale != 1 else x


TRANSFER_BASES = {
    "resnet50v2": ("ResNet50V2", "resnet_v2"),
    "efficientnetb0": ("EfficientNetB0", "efficientnet"),
    "xception": ("Xception", "xception"),
}


def transfer(x, num_classes: int, base: str = "resnet50v2", size: int = 96, weights: str | None = None,
             trainable: bool = True, dropout: float = 0.2):
    """A `keras.applications` backbone on upscaled images. `weights: imagenet` downloads ImageNet
    weights on first use (not possible offline: keep null there)."""
    if base not in TRANSFER_BASES:
        raise ValueError(f"base '{base}' is not one of {', '.join(TRANSFER_BASES)}")
    cls_name, module = TRANSFER_BASES[base]
    app = getattr(keras.applications, cls_name)
    preprocess = getattr(keras.applications, module).preprocess_input
    x = layers.Resizing(size, size)(x)
    backbone = app(include_top=False, weights=weights, input_shape=(size, size, 3), pooling="avg")
    backbone.trainable = trainable
    x = backbone(preprocess(x))
    x = layers.Dropout(dropout)(x)
    return layers.Dense(num_classes)(x)


# The builders above, by the names train.model takes (schemas.MODEL_NAMES, their one home).
MODELS: dict[str, Builder] = {name: globals()[name] for name in MODEL_NAMES}


def arch_options(name: str) -> list[str]:
    return [p for p in inspect.signature(MODELS[name]).parameters if p not in ("x", "num_classes")]


def check_options(name: str, options: dict[str, Any]) -> None:
    """Refuse options that are no keyword of the model's builder (model names: schemas.TrainParams)."""
    allowed = arch_options(name)
    for key in options:
        if key not in allowed:
            raise ConfigError(f"params.yaml: 'train.arch.{name}.{key}' is not an option of {name}; "
                              f"its options: {', '.join(allowed)}")


def gpu_names() -> list[str]:
    """The GPUs TensorFlow sees on this machine."""
    import tensorflow as tf

    with native_stderr_silenced():  # the first probe logs cuInit's failure where there is no GPU
        return [device.name for device in tf.config.list_physical_devices("GPU")]


def check_arch(arch: dict[str, dict[str, Any]], model: str) -> None:
    """Every `train.arch` entry names options its builder takes, and the trained model builds."""
    for name, options in arch.items():
        check_options(name, options)
    check_builds(model, arch.get(model) or {})


def check_builds(name: str, options: dict[str, Any], num_classes: int = 10) -> None:
    """Build the model's body on a symbolic input, so a bad option is a config error before any
    stage runs, not a traceback from inside Keras after the data was prepared."""
    try:
        body(name, keras.Input(shape=IMAGE_SHAPE), num_classes, options)
    except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError) as err:
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"params.yaml: train.arch.{name} {options} does not build a {name} ({text}); "
                          "fix the options (see the builder in stages/common/models.py)") from None


def body(name: str, x, num_classes: int, options: dict[str, Any]):
    """The builder's logits for `x`, with list options passed as the tuples the builders take."""
    if "widths" in options and not options["widths"]:
        raise ValueError("widths is empty; give at least one block width")
    return MODELS[name](x, num_classes, **{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})


def build_model(name: str, num_classes: int, mean: list[float], std: list[float],
                options: dict[str, Any] | None = None, augment: list[layers.Layer] | None = None) -> keras.Model:
    """`MODELS[name]` (with `options`, its `train.arch` entry) behind the augmentation and the fitted
    normalisation, ending in softmax probabilities."""
    inputs = keras.Input(shape=IMAGE_SHAPE, name=INPUT_NAME)
    x = inputs
    for layer in augment or []:
        x = layer(x)
    # keras.applications backbones bring their own preprocessing of raw 0..255 pixels.
    if name != "transfer":
        x = layers.Normalization(mean=mean, variance=np.square(std).tolist(), name="normalize")(x)
    logits = body(name, x, num_classes, options or {})
    outputs = layers.Activation("softmax", dtype="float32", name=OUTPUT_NAME)(logits)
    return keras.Model(inputs, outputs, name=name)


def check_trainable(params: TrainParams, local: bool = True) -> None:
    """What train would refuse once its data is loaded, found now: the model builds and, with
    `local` (training on this machine), a GPU is there when train.require_gpu asks for one."""
    with native_stderr_silenced():  # TensorFlow's device probe
        check_arch(params.arch, params.model)
        if local and params.require_gpu and not gpu_names():
            raise ConfigError("train.require_gpu is true but TensorFlow sees no GPU; run on a GPU machine with "
                              "`pip install -e .[gpu]`, or set train.require_gpu: false")

"""The model zoo: each architecture is one small builder, picked by name from `train.model`.

Every model takes raw pixel values (float, 0..255) and starts with the normalisation that prepare
fitted on the training split, so evaluation and `predict` cannot forget it. Builders return
logits; `build_model` adds the softmax, so the saved model outputs probabilities.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import layers

INPUT_SHAPE = (32, 32, 3)

Builder = Callable[[keras.KerasTensor, int], keras.KerasTensor]


def tutorial_cnn(x: keras.KerasTensor, num_classes: int) -> keras.KerasTensor:
    """TensorFlow's CNN tutorial (seed 003): 3 conv layers, Dense 64; ~122k parameters."""
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    return layers.Dense(num_classes)(x)


def leaky_bn_cnn(x: keras.KerasTensor, num_classes: int) -> keras.KerasTensor:
    """Seed 001: three double-conv LeakyReLU/BatchNorm blocks (32-64-128), Dense 512; ~1.3M parameters."""
    for width, dropout in ((32, 0.2), (64, 0.3), (128, 0.4)):
        for _ in range(2):
            x = layers.Conv2D(width, 3, padding="same")(x)
            x = layers.LeakyReLU(negative_slope=0.1)(x)
            x = layers.BatchNormalization()(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(dropout)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(512)(x)
    x = layers.LeakyReLU(negative_slope=0.1)(x)
    x = layers.BatchNormalization()(x)
    x = layers.Dropout(0.4)(x)
    return layers.Dense(num_classes)(x)


MODELS: dict[str, Builder] = {
    "tutorial_cnn": tutorial_cnn,
    "leaky_bn_cnn": leaky_bn_cnn,
}


def build_model(name: str, num_classes: int, mean: list[float], std: list[float]) -> keras.Model:
    """`MODELS[name]` behind the fitted normalisation, ending in softmax probabilities."""
    inputs = keras.Input(shape=INPUT_SHAPE, name="pixels")
    x = layers.Normalization(mean=mean, variance=np.square(std).tolist(), name="normalize")(inputs)
    logits = MODELS[name](x, num_classes)
    outputs = layers.Activation("softmax", dtype="float32", name="probabilities")(logits)
    return keras.Model(inputs, outputs, name=name)

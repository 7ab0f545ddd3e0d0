"""The project's own Keras layers and initialisers, and what sets them up: airbench's identity
initialisation, the frozen patch-whitening stem fitted to the training images, alternating flips
and the training-only augmentation layers. Registered with Keras, so a saved model loads with them."""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from stages.common.schemas import ALTERNATING_FLIPS, IMAGE_SHAPE


@keras.saving.register_keras_serializable(package="cifar10_pipeline")
class PartialIdentity(keras.initializers.Initializer):
    """Keras' default conv kernel (Glorot uniform), except that the first min(in, out) filters pass
    their own input channel through unchanged: airbench's identity ("dirac") initialisation, which
    starts each block close to the identity."""

    def __call__(self, shape, dtype=None):
        height, width, channels_in, channels_out = shape
        passed = min(channels_in, channels_out)
        mask = np.zeros(shape, bool)
        mask[..., :passed] = True
        identity = np.zeros(shape, np.float32)
        identity[height // 2, width // 2, np.arange(passed), np.arange(passed)] = 1.0
        base = keras.initializers.GlorotUniform()(shape, dtype)
        return keras.ops.where(mask, keras.ops.cast(identity, base.dtype), base)


WHITEN_LAYER = "whiten"
WHITEN_PATCH = 2  # pixels a side


def fit_whitening(model: keras.Model, images: np.ndarray, mean: list[float], std: list[float],
                  sample: int = 5000, eps: float = 5e-4) -> bool:
    """Set the frozen whitening layer's kernel (if the model has one) from the covariance of the 2x2
    patches of up to `sample` normalised training images: each eigenvector, scaled by 1/sqrt of its
    eigenvalue, and its negative (airbench). Returns whether there was a layer to fit."""
    try:
        layer = model.get_layer(WHITEN_LAYER)
    except ValueError:
        return False
    channels = images.shape[-1]
    pixels = ((images[:sample] - np.asarray(mean)) / np.asarray(std)).astype(np.float32)
    windows = np.lib.stride_tricks.sliding_window_view(pixels, (WHITEN_PATCH, WHITEN_PATCH), axis=(1, 2))
    # N, 31, 31, channel, row, col -> one row per patch in the kernel's (row, col, channel) order
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, WHITEN_PATCH * WHITEN_PATCH * channels)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
    filters = eigenvectors / np.sqrt(eigenvalues + eps)  # one whitening filter per column
    kernel = np.concatenate([filters, -filters], axis=1).reshape(WHITEN_PATCH, WHITEN_PATCH, channels, -1)
    layer.kernel.assign(kernel.astype(np.float32))
    return True


@keras.saving.register_keras_serializable(package="cifar10_pipeline")
class AlternatingFlip(layers.Layer):
    """airbench's deterministic flips: in training, each image is mirrored in every other epoch,
    so any two epochs running show it both ways (independent random flips show half of the images
    the same way round twice running). Which epochs mirror an image rests on one bit of the
    image itself, the parity of the sum of a seeded half of its pixels, where airbench draws a random
    bit per image in the first epoch: the layer sees batches, not which image is which. `epoch` is
    set as each epoch begins (callbacks.FlipEpochs); inference passes images through untouched."""

    def __init__(self, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        # int32, not float: lookahead averages the float weights, and a half epoch has no parity.
        self.epoch = self.add_weight(shape=(), initializer="zeros", dtype="int32", trainable=False, name="epoch")
        self.pixel_mask = np.random.default_rng(seed).integers(0, 2, IMAGE_SHAPE).astype(np.int32)

    def call(self, inputs, training=None):
        if not training:
            return inputs
        ops = keras.ops
        # Integer arithmetic: exact in any dtype policy (a float16 sum of 3,072 pixels overflows).
        parity = ops.sum(ops.cast(inputs, "int32") * self.pixel_mask, axis=(1, 2, 3)) % 2
        mirrored = ops.equal((parity + self.epoch) % 2, 1)
        return ops.where(ops.reshape(mirrored, (-1, 1, 1, 1)), ops.flip(inputs, axis=2), inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "seed": self.seed}


def augmentation(flip: bool | str, crop_pad: int, rotation: float, zoom: float, contrast: float, shear: float,
                 seed: int, fill_value: float = 0.0, crop_interpolation: str = "bilinear") -> list[layers.Layer]:
    """Training-only augmentation layers on raw pixels (Keras disables them at inference).

    `flip`: true mirrors each image at random, "alternating" in every other epoch (AlternatingFlip).
    `fill_value` fills what shifts, rotations, zooms and shears uncover; the mean pixel keeps the
    fill close to 0 after standardisation, as it was when these layers ran after it.
    """
    fill = {"fill_mode": "constant", "fill_value": fill_value, "seed": seed}
    out: list[layers.Layer] = []
    if flip == ALTERNATING_FLIPS:
        out.append(AlternatingFlip(seed))
    elif flip:
        out.append(layers.RandomFlip("horizontal", seed=seed))
    if crop_pad:
        out.append(layers.RandomTranslation(crop_pad / 32, crop_pad / 32, interpolation=crop_interpolation, **fill))
    if rotation:
        out.append(layers.RandomRotation(rotation, **fill))
    if zoom:
        out.append(layers.RandomZoom(zoom, **fill))
    if contrast:
        out.append(layers.RandomContrast(contrast, value_range=(0, 255), seed=seed))
    if shear:
        out.append(layers.RandomShear(x_factor=shear, y_factor=shear, **fill))
    return out


def all_layers(model: keras.Model):
    """Every layer of the model, those of nested models (a transfer backbone) included."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)

"""Predictions with the exported model (ONNX Runtime, no TensorFlow): images of any size or mode
decoded as a person sees them. `cifar10-pipeline predict` and the inference API share this path."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.common.errors import ConfigError
from stages.common.schemas import IMAGE_SHAPE

INPUT_SIZE = IMAGE_SHAPE[1::-1]  # (width, height), as Pillow names a size
DEFAULT_TOP_K = 3  # classes shown per image by `predict` and the API alike


class PredictError(ConfigError):
    """An image that cannot be read, named with the fix (exit 2, as a bad argument)."""


def to_rgb(img: Image.Image) -> Image.Image:
    """The picture as a person sees it, in 8-bit RGB: upright (EXIF orientation), transparent parts
    on white, 16-bit and float images scaled to 0..255 rather than clipped."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def load_pixels(path: Path) -> np.ndarray:
    """An image file -> (32, 32, 3) float pixels in 0..255, as the model was trained on."""
    if not path.is_file():
        raise PredictError(f"{path} not found; pass existing image files")
    return decode_pixels(path, str(path))


def decode_pixels(source: Path | BinaryIO, name: str) -> np.ndarray:
    """Any size or mode -> (32, 32, 3) float pixels in 0..255; errors name the image as `name`."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns below twice its pixel limit; an image that large is refused too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                rgb = to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise PredictError(f"{name} is too large to be a safe image to decode ({err})") from None
    except PermissionError:
        raise PredictError(f"{name} cannot be read (permission denied); fix its permissions") from None
    except UnidentifiedImageError:
        raise PredictError(f"{name} is not a readable image (no format Pillow decodes); send a JPEG, PNG, ...") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise PredictError(f"{name} is not a readable image ({err})") from None
    if rgb.size != INPUT_SIZE:
        rgb = rgb.resize(INPUT_SIZE, Image.Resampling.BICUBIC)
    return np.asarray(rgb, dtype=np.float32)


def image_files(paths: list[Path]) -> list[Path]:
    """The files to predict: each file given, and the image files inside each folder given."""
    from stages.common.dataio import IMAGE_SUFFIXES

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not inside:
                raise PredictError(f"{path} is a folder with no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
            files += inside
        else:
            files.append(path)
    return files


Prediction = tuple[Path, list[tuple[str, float]] | PredictError]


def predict_files(paths: list[Path], exports: Path, top_k: int = DEFAULT_TOP_K) -> Iterator[Prediction]:
    """For each image file (or each image in a folder) its `top_k` likeliest classes with
    probabilities, from the export in `exports`; an image that cannot be read yields its error
    instead, and the others are still predicted."""
    from stages.common.serving import load_exported

    model, _ = load_exported(exports)
    files = image_files(paths)
    pixels: dict[Path, np.ndarray | PredictError] = {}
    for path in files:
        try:
            pixels[path] = load_pixels(path)
        except PredictError as err:
            pixels[path] = err
    readable = [path for path in files if not isinstance(pixels[path], PredictError)]
    ranked = dict(zip(readable, model.top_k(np.stack([pixels[p] for p in readable]), top_k))) if readable else {}
    for path in files:
        outcome = pixels[path]
        yield path, outcome if isinstance(outcome, PredictError) else ranked[path]

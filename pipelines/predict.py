"""Predictions with the exported model (ONNX Runtime, no TensorFlow): images of any size or mode
decoded as a person sees them, from files, folders and archives of any size, streamed in batches.
`cifar10-pipeline predict` and the inference API share the decoding."""

from __future__ import annotations

import io
import itertools
import os
import tarfile
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.common.dataio import archive_members
from stages.common.errors import ConfigError
from stages.common.schemas import IMAGE_SHAPE

if TYPE_CHECKING:
    from stages.common.serving import OnnxClassifier

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


# A file inside an archive larger than this is reported and skipped unread: memory stays bounded
# whatever the archive holds.
MAX_MEMBER_BYTES = 64 * 1024 * 1024
Source = tuple[str, Path | bytes | PredictError]  # an image's name and its file, its bytes, or why not


def is_image_name(name: str) -> bool:
    """An image file by its name; dot files and macOS' resource forks are not the user's images
    (the prepare stage's rule, dataio's, which every stage imports: it stays where it is)."""
    from stages.common.dataio import _HIDDEN, IMAGE_SUFFIXES

    return Path(name).suffix.lower() in IMAGE_SUFFIXES and not _HIDDEN.search(Path(name).as_posix())


def archive_kind(path: Path) -> str | None:
    """'tar' or 'zip' for an archive (by its first bytes), None for anything else."""
    from stages.common.dataio import container_of
    from stages.common.errors import IntegrityError

    if is_image_name(path.name) or not path.is_file():
        return None
    try:
        return container_of(path)
    except (IntegrityError, OSError):
        return None


def archive_images(path: Path, kind: str) -> Iterator[Source]:
    """The image files in an archive, streamed; one too large is an error in its place, and so is
    damage that ends the archive early (the images before it are kept)."""
    try:
        for name, size, read in archive_members(path, kind):
            if not is_image_name(name):
                continue
            where = f"{path}:{name}"
            if size > MAX_MEMBER_BYTES:
                yield where, PredictError(f"{where} is larger than {MAX_MEMBER_BYTES >> 20} MiB; skipped unread")
            else:
                yield where, read()
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        yield str(path), PredictError(f"{path} is a corrupt or truncated archive ({err}); the images after the "
                                      "damage were not read")


def counted_images(path: Path, kind: str) -> int | None:
    """How many images an archive holds, when that is cheap to know (a zip's directory)."""
    if kind != "zip":
        return None
    try:
        with zipfile.ZipFile(path) as zf:
            return sum(is_image_name(info.filename) for info in zf.infolist() if not info.is_dir())
    except (zipfile.BadZipFile, OSError):
        return None  # reading it says what is wrong


def image_sources(paths: list[Path]) -> tuple[Iterator[Source], int | None]:
    """The images to predict, lazily: each file given, the image files in each folder (sorted) and
    in each archive (tar, tar.gz/bz2/xz, zip: in archive order); with their number when known."""
    parts: list[Iterator[Source] | list[Source]] = []
    total: int | None = 0
    for path in paths:
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(str(p.relative_to(path))))
            if not inside:
                from stages.common.dataio import IMAGE_SUFFIXES

                raise PredictError(f"{path} is a folder with no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
            parts.append([(str(p), p) for p in inside])
            total = None if total is None else total + len(inside)
        elif (kind := archive_kind(path)) is not None:
            parts.append(archive_images(path, kind))
            count = counted_images(path, kind)
            total = None if total is None or count is None else total + count
        else:
            parts.append([(str(path), path)])
            total = None if total is None else total + 1
    return (source for part in parts for source in part), total


def decode_source(source: Source) -> tuple[str, np.ndarray | PredictError]:
    name, content = source
    if isinstance(content, PredictError):
        return name, content
    try:
        if isinstance(content, Path):
            return name, load_pixels(content)
        return name, decode_pixels(io.BytesIO(content), name)
    except PredictError as err:
        return name, err


Prediction = tuple[str, list[tuple[str, float]] | PredictError]


def rank(probabilities: np.ndarray, classes: list[str], k: int) -> list[list[tuple[str, float]]]:
    """For each row of probabilities its k likeliest classes, best first, as (name, probability)."""
    order = np.argsort(-probabilities, axis=1)[:, :k]
    return [[(classes[j], float(row[j])) for j in best] for row, best in zip(probabilities, order)]


def predict_sources(sources: Iterator[Source], model: OnnxClassifier, top_k: int = DEFAULT_TOP_K,
                    batch_size: int = 256) -> Iterator[Prediction]:
    """For each image its `top_k` likeliest classes with probabilities, or the error that kept it from
    being read, in the order given. Batches of `batch_size` images are decoded on a pool of threads
    while the model runs on the previous batch, so memory holds two batches whatever the number of
    images."""
    def finish(batch: list[Future[tuple[str, np.ndarray | PredictError]]]) -> Iterator[Prediction]:
        decoded = [future.result() for future in batch]
        readable = [pixels for _, pixels in decoded if not isinstance(pixels, PredictError)]
        ranked = iter(rank(model.probabilities(np.stack(readable)), model.classes, top_k) if readable else [])
        for name, pixels in decoded:
            yield name, pixels if isinstance(pixels, PredictError) else next(ranked)

    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0)), thread_name_prefix="decode") as pool:
        previous: list[Future[tuple[str, np.ndarray | PredictError]]] = []
        for chunk in iter(lambda: list(itertools.islice(sources, batch_size)), []):
            submitted = [pool.submit(decode_source, source) for source in chunk]
            yield from finish(previous)
            previous = submitted
        yield from finish(previous)


def predict_files(paths: list[Path], exports: Path, top_k: int = DEFAULT_TOP_K) -> Iterator[Prediction]:
    """`predict_sources` for files, folders and archives, with the export in `exports`."""
    from stages.common.serving import load_exported

    model, _ = load_exported(exports)
    sources, _ = image_sources(paths)
    return predict_sources(sources, model, top_k)


def csv_header(top_k: int) -> list[str]:
    ranks = [column for rank in range(2, top_k + 1) for column in (f"class_{rank}", f"probability_{rank}")]
    return ["file", "class", "probability", *ranks, "error"]


def write_predictions(predictions: Iterator[Prediction], out: Path | None, top_k: int) -> Iterator[Prediction]:
    """Pass the predictions on and, with `out`, write them as CSV (one row per image; an image that
    could not be read has its error instead of classes). The file appears whole once the last
    prediction has passed; stopped before that, it is not written at all."""
    if out is None:
        yield from predictions
        return
    import csv

    from stages.common.dataio import atomic_path

    with atomic_path(out) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(csv_header(top_k))
        for name, ranked in predictions:
            if isinstance(ranked, PredictError):
                writer.writerow([name, *[""] * (2 * top_k), str(ranked)])
            else:
                writer.writerow([name, *(v for label, p in ranked for v in (label, f"{p:.6f}")), ""])
            yield name, ranked

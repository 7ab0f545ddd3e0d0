"""Tiny generated datasets in both raw layouts, for tests (no real data is ever downloaded).

Each class gets a distinct colour and stripe pattern plus noise, so a 1-epoch model learns
something and images are never blank or duplicated.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_images(n_per_class: int, classes: list[str] = CLASSES, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(len(classes)):
        base = np.array([(label * 67) % 256, (label * 131 + 40) % 256, (label * 29 + 90) % 256], dtype=np.float64)
        for _ in range(n_per_class):
            img = np.tile(base, (32, 32, 1))
            img[:, :: (label % 4) + 2] += 60
            img += rng.normal(0, 25, size=img.shape)
            images.append(np.clip(img, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels)


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def class_folder_files(n_train: int, n_test: int, classes: list[str] = CLASSES) -> dict[str, bytes]:
    """{'train/cat/0001.png': bytes, ...}; PNG keeps pixels exact."""
    files = {}
    for split, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        images, labels = make_images(n, classes, seed)
        for i, (image, label) in enumerate(zip(images, labels)):
            files[f"{split}/{classes[label]}/{i:04d}.png"] = png_bytes(image)
    return files


def write_tar_gz(path: Path, files: dict[str, bytes], prefix: str = "") -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, content in files.items():
            info = tarfile.TarInfo(prefix + name)
            info.size = len(content)
            tf.addfile(info, io.BytesIO(content))
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in files.items():
            zf.writestr(name, content)
    return path


def write_directory(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    return root


def pickle_batches_files(n_train_per_batch: int, n_test: int) -> dict[str, bytes]:
    """The official python layout: 5 training batches, a test batch and batches.meta."""

    def batch(n: int, seed: int) -> bytes:
        images, labels = make_images(max(1, n // len(CLASSES)), seed=seed)
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        return pickle.dumps({b"data": data, b"labels": labels.tolist()})

    files = {f"cifar-10-batches-py/data_batch_{i}": batch(n_train_per_batch, 10 + i) for i in range(1, 6)}
    files["cifar-10-batches-py/test_batch"] = batch(n_test, 20)
    files["cifar-10-batches-py/batches.meta"] = pickle.dumps({b"label_names": [c.encode() for c in CLASSES]})
    return files

"""prepare: decode the raw archive to uint8 arrays, split train/validation, fit normalisation.

Outputs in its folder (paths.prepared): `{train,val,test}.npz` (images uint8 (N, 32, 32, 3), labels int64),
`classes.json`, `normalization.json` (per-channel mean/std in pixel units, applied by the model's
first layer) and `metadata.csv`, one row per image, which the validate stage checks.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from stages.common import dataio
from stages.common.errors import DataError, run_main
from stages.common.params import load_section
from stages.common.paths import CLASSES, MANIFEST, METADATA, NORMALIZATION, split_file, stage_paths
from stages.common.schemas import IMAGE_SHAPE, PrepareParams, smallest_class_size

# --- pure parts ----------------------------------------------------------------------------


def decode_image(content: bytes, name: str, convert: bool, conversions: list[dict] | None = None) -> np.ndarray:
    """A (32, 32, 3) uint8 array; other sizes/modes are an error unless `convert`, in which case
    the conversion is recorded in `conversions`."""
    try:
        with Image.open(io.BytesIO(content)) as img:
            img.load()
            if img.mode != "RGB" or img.size != IMAGE_SHAPE[1::-1]:
                if not convert:
                    raise DataError(
                        f"{name} is {img.size[0]}x{img.size[1]} {img.mode}, expected 32x32 RGB; "
                        "fix the file or set prepare.convert_images: true to convert it"
                    )
                if conversions is not None:
                    conversions.append({"file": name, "size": list(img.size), "mode": img.mode})
                img = img.convert("RGB").resize(IMAGE_SHAPE[1::-1], Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{name} cannot be decoded as an image ({err}); remove or replace it") from None


def unpickle_batch(content: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = pickle.loads(content, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{name}: expected rows of 3072 bytes (32x32x3), got shape {data.shape}")
    # The batches store each image channel-first (1024 R, 1024 G, 1024 B).
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def stratified_split(
    labels: np.ndarray, val_fraction: float, limit_per_class: int | None, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): shuffled within each class, so sorted sources split fairly."""
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        if limit_per_class is not None:
            idx = idx[:limit_per_class]
        n_val = round(len(idx) * val_fraction)
        if not 1 <= n_val <= len(idx) - 1:
            raise DataError(f"class {cls} has {len(idx)} training image(s), too few to split with prepare.val_fraction "
                            f"{val_fraction:g}; it needs at least {smallest_class_size(val_fraction)} (or change "
                            "prepare.val_fraction)")
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(val_idx))


def limited_per_class(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Indices of at most `limit` images of each class, drawn at random, in their original order
    (all of them without a limit)."""
    if limit is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(np.flatnonzero(labels == cls))[:limit] for cls in np.unique(labels)]
    return np.sort(np.concatenate(kept))


def fit_normalization(train_images: np.ndarray, method: str) -> dict:
    """Per-channel mean and std in pixel units (0..255), from the training split only."""
    if method == "scale":
        mean, std = np.zeros(3), np.full(3, 255.0)
    else:
        # Exact moments from per-channel histograms: no float copy of the whole split.
        values = np.arange(256, dtype=np.float64)
        hists = [np.bincount(train_images[..., c].ravel(), minlength=256) for c in range(3)]
        mean = np.array([h @ values / h.sum() for h in hists])
        std = np.sqrt([h @ (values - m) ** 2 / h.sum() for h, m in zip(hists, mean)])
    return {"method": method, "mean": mean.tolist(), "std": std.tolist()}


def image_metadata(images: np.ndarray, labels: np.ndarray, split: str, classes: list[str]) -> pd.DataFrame:
    """One row per image: what validate checks (shape, pixel range and spread, content hash)."""
    flat = images.reshape(len(images), -1)
    n = max(flat.shape[1], 1)
    # Integer moments keep this fast: a float64 copy of 60,000 images would be 1.5 GB.
    mean = flat.sum(axis=1, dtype=np.int64) / n
    std = np.sqrt(np.maximum(np.einsum("ij,ij->i", flat, flat, dtype=np.int64) / n - mean**2, 0.0))
    return pd.DataFrame(
        {
            "split": split,
            "index": np.arange(len(images)),
            "label": labels,
            "class_name": [classes[i] if 0 <= i < len(classes) else None for i in labels],
            "height": images.shape[1],
            "width": images.shape[2],
            "channels": images.shape[3],
            "pixel_min": flat.min(axis=1, initial=255),
            "pixel_max": flat.max(axis=1, initial=0),
            "pixel_mean": mean.round(4),
            "pixel_std": std.round(4),
            "content_hash": [hashlib.blake2b(row.tobytes(), digest_size=16).hexdigest() for row in flat],
        }
    )


# --- reading the raw archive ---------------------------------------------------------------


def read_raw(
    raw_dir: Path, convert: bool, conversions: list[dict] | None = None
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """{'train'|'test': (images, labels)} and the class names, as download recorded them."""
    manifest = dataio.read_json(raw_dir / MANIFEST)
    needed = {"classes", "container", "layout"}
    if manifest.get("layout") == "pickle-batches":
        needed.add("source_classes")
    if missing := sorted(needed - set(manifest)):
        raise DataError(f"{raw_dir / MANIFEST} lacks {', '.join(missing)} (written by an older download); "
                        "rerun `dvc repro -f download`")
    archive, classes = raw_dir / "archive", manifest["classes"]
    members = dataio.iter_members(archive, manifest["container"])
    if manifest["layout"] == "pickle-batches":
        pickles = _read_pickles(members)
        remap = label_map(manifest["source_classes"], classes)
        return {split: (images, remap[labels]) for split, (images, labels) in pickles.items()}, classes
    return _read_class_folders(members, classes, convert, conversions), classes


def label_map(source_classes: list[str], classes: list[str]) -> np.ndarray:
    """Array mapping the archive's label numbers to positions in `classes` (download.classes'
    order), by name: a download.classes in another order than batches.meta relabels, never
    mislabels."""
    return np.asarray([classes.index(name) for name in source_classes], dtype=np.int64)


def _read_pickles(members) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"train": [], "test": []}
    for name, content in members:
        base = dataio.pickle_entry(name)
        if base in dataio.PICKLE_TRAIN:
            parts["train"].append(unpickle_batch(content, name))
        elif base == dataio.PICKLE_TEST:
            parts["test"].append(unpickle_batch(content, name))
    return {s: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v])) for s, v in parts.items()}


def _read_class_folders(
    members, classes: list[str], convert: bool, conversions: list[dict] | None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    label_of = {c: i for i, c in enumerate(classes)}
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[int]] = {"train": [], "test": []}
    for name, content in members:
        entry = dataio.class_folder_entry(name)
        if entry is None:
            continue
        split, cls = entry
        images[split].append(decode_image(content, name, convert, conversions))
        labels[split].append(label_of[cls])
    return {s: (np.stack(images[s]), np.asarray(labels[s], dtype=np.int64)) for s in images}


# --- stage ---------------------------------------------------------------------------------


def prepare(
    source: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], params: PrepareParams
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict, pd.DataFrame]:
    """Split and describe: (splits, normalization, metadata table)."""
    pool_images, pool_labels = source["train"]
    train_idx, val_idx = stratified_split(pool_labels, params.val_fraction, params.train_limit_per_class, params.seed)
    test_images, test_labels = source["test"]
    test_idx = limited_per_class(test_labels, params.test_limit_per_class, params.seed)
    splits = {
        "train": (pool_images[train_idx], pool_labels[train_idx]),
        "val": (pool_images[val_idx], pool_labels[val_idx]),
        "test": (test_images[test_idx], test_labels[test_idx]),
    }
    norm = fit_normalization(splits["train"][0], params.normalization)
    table = pd.concat([image_metadata(x, y, s, classes) for s, (x, y) in splits.items()], ignore_index=True)
    return splits, norm, table


def write_prepared(
    out_dir: Path, splits, classes: list[str], norm: dict, table: pd.DataFrame, conversions: list[dict]
) -> None:
    with dataio.atomic_dir(out_dir) as tmp:
        for split, (images, labels) in splits.items():
            dataio.save_split(tmp / split_file(split), images, labels)
        dataio.write_json(tmp / CLASSES, classes)
        dataio.write_json(tmp / NORMALIZATION, norm)
        table.to_csv(tmp / METADATA, index=False)
        dataio.write_json(tmp / "conversions.json", conversions)


def main() -> None:
    paths = stage_paths("prepare", "raw", "out")
    params: PrepareParams = load_section("prepare")
    conversions: list[dict] = []
    source, classes = read_raw(paths["raw"], params.convert_images, conversions)
    splits, norm, table = prepare(source, classes, params)
    write_prepared(paths["out"], splits, classes, norm, table, conversions)
    sizes = ", ".join(f"{s} {len(y):,}" for s, (_, y) in splits.items())
    converted = f", {len(conversions)} converted to 32x32 RGB" if conversions else ""
    print(f"prepare: {sizes} images{converted}, normalization {norm['method']} -> {paths['out']}")


if __name__ == "__main__":
    run_main(main)

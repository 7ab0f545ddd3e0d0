import numpy as np
import pytest

from stages.common.errors import DataError
from stages.common.schemas import PrepareParams
from stages.prepare import (
    decode_image,
    fit_normalization,
    image_metadata,
    prepare,
    stratified_split,
    unpickle_batch,
)
from tests import synthetic


def test_split_is_stratified_shuffled_and_seeded():
    labels = np.repeat(np.arange(10), 100)  # sorted by class, like the JPEG mirror
    train, val = stratified_split(labels, 0.1, None, seed=7)
    assert len(val) == 100 and len(train) == 900 and not set(train) & set(val)
    assert np.bincount(labels[val], minlength=10).tolist() == [10] * 10
    train2, val2 = stratified_split(labels, 0.1, None, seed=7)
    assert np.array_equal(val, val2) and np.array_equal(train, train2)
    assert not np.array_equal(val, stratified_split(labels, 0.1, None, seed=8)[1])


def test_train_limit_per_class():
    labels = np.repeat(np.arange(3), 50)
    train, val = stratified_split(labels, 0.2, 10, seed=0)
    assert np.bincount(labels[train]).tolist() == [8, 8, 8]
    assert np.bincount(labels[val]).tolist() == [2, 2, 2]


def test_normalization_matches_numpy_and_uses_train_only():
    images, _ = synthetic.make_images(4, ["a", "b"])
    norm = fit_normalization(images, "standardize")
    pixels = images.reshape(-1, 3).astype(np.float64)
    assert np.allclose(norm["mean"], pixels.mean(axis=0)) and np.allclose(norm["std"], pixels.std(axis=0))
    assert fit_normalization(images, "scale") == {"method": "scale", "mean": [0, 0, 0], "std": [255, 255, 255]}


def test_prepare_keeps_uint8_and_fits_on_train_split():
    images, labels = synthetic.make_images(10, ["a", "b"])
    test = (images[:4] // 2, labels[:4])
    splits, norm, table = prepare({"train": (images, labels), "test": test}, ["a", "b"],
                                  PrepareParams(0.2, "standardize", None, None, False, 0))
    assert all(x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3) for x, _ in splits.values())
    assert [len(y) for _, y in splits.values()] == [16, 4, 4]
    assert np.allclose(norm["mean"], splits["train"][0].reshape(-1, 3).mean(axis=0))
    assert table.groupby("split").size().to_dict() == {"test": 4, "train": 16, "val": 4}


def test_metadata_describes_each_image():
    images = np.zeros((2, 32, 32, 3), np.uint8)
    images[1] = 200
    images[1, 0, 0] = 10
    table = image_metadata(images, np.array([0, 1]), "train", ["a", "b"])
    assert table["pixel_std"].iloc[0] == 0 and table["pixel_min"].iloc[1] == 10 and table["pixel_max"].iloc[1] == 200
    flat = images[1].reshape(-1).astype(float)
    assert table["pixel_std"].iloc[1] == pytest.approx(flat.std(), abs=1e-3)
    assert table["content_hash"].nunique() == 2 and table["class_name"].tolist() == ["a", "b"]


def test_decode_rejects_or_converts_wrong_size_and_mode():
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("L", (40, 30), 128).save(buf, format="PNG")
    with pytest.raises(DataError, match="cat/1.png is 40x30 L, expected 32x32 RGB.*convert_images"):
        decode_image(buf.getvalue(), "cat/1.png", convert=False)
    conversions: list[dict] = []
    assert decode_image(buf.getvalue(), "cat/1.png", convert=True, conversions=conversions).shape == (32, 32, 3)
    assert conversions == [{"file": "cat/1.png", "size": [40, 30], "mode": "L"}]
    with pytest.raises(DataError, match="cat/2.jpg cannot be decoded"):
        decode_image(b"not an image", "cat/2.jpg", convert=False)


def test_pickle_batches_decode_channel_first_rows():
    files = synthetic.pickle_batches_files(10, 10)
    decoded, decoded_labels = unpickle_batch(files["cifar-10-batches-py/test_batch"], "test_batch")
    expected, expected_labels = synthetic.make_images(1, seed=20)
    assert np.array_equal(decoded, expected) and np.array_equal(decoded_labels, expected_labels)


def test_a_test_limit_keeps_that_many_of_each_class_for_a_quick_look():
    images, labels = synthetic.make_images(10, ["a", "b"])
    test = (images, labels)
    splits, _, _ = prepare({"train": (images, labels), "test": test}, ["a", "b"],
                           PrepareParams(0.2, "standardize", None, 3, False, 0))
    kept_images, kept_labels = splits["test"]
    assert np.bincount(kept_labels).tolist() == [3, 3]
    assert all(any((kept == image).all() for image in images) for kept in kept_images)

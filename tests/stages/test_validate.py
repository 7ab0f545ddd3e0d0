import numpy as np
import pandas as pd

from stages.common.schemas import ExpectedPerClass, PrepareParams, ValidateParams
from stages.prepare import prepare
from stages.validate import class_counts_table, expected_counts, validate
from tests import synthetic

CLASSES = ["a", "b", "c"]
PREPARE = PrepareParams(0.2, "standardize", None, None, False, 0)
PARAMS = ValidateParams(ExpectedPerClass(train=10, test=4), 0.1, 1.0, 1.0)


def prepared(train_images=None, train_labels=None):
    images, labels = synthetic.make_images(10, CLASSES, seed=1)
    test_images, test_labels = synthetic.make_images(4, CLASSES, seed=2)
    source = {"train": (images if train_images is None else train_images, labels if train_labels is None else train_labels),
              "test": (test_images, test_labels)}
    _, norm, table = prepare(source, CLASSES, PREPARE)
    return table, norm


def failed_columns(failures: list[str]) -> str:
    return "\n".join(failures)


def test_good_data_passes_and_every_result_is_tabled():
    from stages.common.render import validation_table

    table, norm = prepared()
    results, failures = validate(table, CLASSES, norm, PARAMS, PREPARE)
    assert failures == []
    assert set(results) == {"images", "class_counts", "normalization"}
    rows = validation_table(results).splitlines()[2:]
    assert len(rows) == sum(len(r["results"]) for r in results.values()) and all("| pass |" in r for r in rows)
    assert "| class_counts | expect_table_row_count_to_equal | value=" in "\n".join(rows)


def test_planted_problems_are_each_reported():
    table, norm = prepared()
    table.loc[0, "label"] = 7                       # label out of range
    table.loc[1, "pixel_std"] = 0.0                 # blank image
    table.loc[2, "pixel_mean"] = np.nan             # non-finite value
    test_row = table.index[table["split"] == "test"][0]
    table.loc[test_row, "content_hash"] = table.loc[3, "content_hash"]  # test image also in train
    table.loc[4, "height"] = 31
    results, failures = validate(table, CLASSES, norm, PARAMS, PREPARE)
    text = failed_columns(failures)
    assert "'column': 'label'" in text
    from stages.common.render import validation_table

    assert validation_table(results).count("| **FAIL** |") == len(failures)
    assert "'column': 'pixel_std'" in text
    assert "expect_column_values_to_not_be_null {'column': 'pixel_mean'}" in text
    assert "'column': 'in_test_and_fit'" in text
    assert "'column': 'height'" in text


def test_missing_class_and_wrong_counts_fail():
    images, labels = synthetic.make_images(10, CLASSES, seed=1)
    keep = labels != 2
    table, norm = prepared(images[keep], labels[keep])
    _, failures = validate(table, CLASSES, norm, PARAMS, PREPARE)
    text = failed_columns(failures)
    assert "'column': 'count', 'min_value': 1" in text
    assert "column_A': 'count', 'column_B': 'expected_count'" in text


def test_imbalance_beyond_tolerance_fails_and_counts_can_be_skipped():
    images, labels = synthetic.make_images(10, CLASSES, seed=1)
    keep = ~((labels == 0) & (np.arange(len(labels)) % 10 < 5))  # class a loses half its images
    table, norm = prepared(images[keep], labels[keep])
    lenient = ValidateParams(None, 0.1, 1.0, 1.0)
    _, failures = validate(table, CLASSES, norm, lenient, PREPARE)
    assert len(failures) == 1 and "'column': 'share'" in failures[0]


def test_bad_normalization_statistics_fail():
    table, norm = prepared()
    norm = {**norm, "std": [0.0, float("nan"), 60.0]}
    _, failures = validate(table, CLASSES, norm, PARAMS, PREPARE)
    text = failed_columns(failures)
    assert "{'column': 'std'}" in text and "'column': 'std', 'min_value': 1.0" in text


def test_expected_counts_follow_the_split_params():
    assert expected_counts(ExpectedPerClass(5000, 1000), PrepareParams(0.1, "scale", None, None, False, 0)) == \
        {"train": 4500, "val": 500, "test": 1000}
    assert expected_counts(ExpectedPerClass(5000, 1000), PrepareParams(0.2, "scale", 100, None, False, 0)) == \
        {"train": 80, "val": 20, "test": 1000}
    assert expected_counts(ExpectedPerClass(5000, 1000), PrepareParams(0.2, "scale", 100, 50, False, 0)) == \
        {"train": 80, "val": 20, "test": 50}
    assert expected_counts(None, PREPARE) is None


def test_class_counts_table_zero_fills_missing_classes():
    images = pd.DataFrame({"split": ["train", "train", "val", "test"], "label": [0, 1, 0, 1]})
    counts = class_counts_table(images, ["a", "b"], None)
    assert len(counts) == 6
    assert counts.set_index(["split", "label"])["count"].to_dict()[("val", 1)] == 0

"""validate: Great Expectations checks on the prepared data; any failure stops the pipeline.

Three tables are validated: `images` (prepare's metadata.csv, one row per image),
`class_counts` (images per split and class, derived here) and `normalization` (per-channel
statistics the model will apply). Results go to its folder (paths.validate) as GX's JSON
and Data Docs.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from stages.common import dataio
from stages.common.errors import DataError, run_main
from stages.common.params import load_section
from stages.common.paths import CLASSES, METADATA, NORMALIZATION, VALIDATION, stage_paths
from stages.common.render import render_html, validation_table
from stages.common.schemas import ExpectedPerClass, PrepareParams, ValidateParams

IMAGE_COLUMNS = [
    "split", "index", "label", "class_name", "height", "width", "channels",
    "pixel_min", "pixel_max", "pixel_mean", "pixel_std", "content_hash",
]


# --- tables --------------------------------------------------------------------------------


def expected_counts(expected: ExpectedPerClass | None, prepare: PrepareParams) -> dict[str, int] | None:
    """Images per class in each split, as prepare should have produced them."""
    if expected is None:
        return None
    pool = expected.train if prepare.train_limit_per_class is None else min(expected.train, prepare.train_limit_per_class)
    n_val = round(pool * prepare.val_fraction)
    test = expected.test if prepare.test_limit_per_class is None else min(expected.test, prepare.test_limit_per_class)
    return {"train": pool - n_val, "val": n_val, "test": test}


def class_counts_table(images: pd.DataFrame, classes: list[str], expected: dict[str, int] | None) -> pd.DataFrame:
    """One row per (split, class), zero-filled, so a missing class shows as count 0."""
    grid = pd.MultiIndex.from_product([dataio.SPLITS, range(len(classes))], names=["split", "label"])
    counts = images.groupby(["split", "label"]).size().reindex(grid, fill_value=0).rename("count").reset_index()
    totals = counts.groupby("split")["count"].transform("sum")
    counts["share"] = np.where(totals > 0, counts["count"] / totals.where(totals > 0, 1), 0.0)
    counts["class_name"] = [classes[i] for i in counts["label"]]
    counts["expected_count"] = counts["split"].map(expected) if expected else counts["count"]
    return counts


def with_leakage_flag(images: pd.DataFrame) -> pd.DataFrame:
    """Flag images whose exact pixels appear both in test and in train/val."""
    is_test = images["split"] == "test"
    test_hashes = set(images.loc[is_test, "content_hash"])
    fit_hashes = set(images.loc[~is_test, "content_hash"])
    leaked = np.where(is_test, images["content_hash"].isin(fit_hashes), images["content_hash"].isin(test_hashes))
    return images.assign(in_test_and_fit=leaked)


def normalization_table(norm: dict) -> pd.DataFrame:
    return pd.DataFrame({"channel": ["R", "G", "B"], "mean": norm["mean"], "std": norm["std"]})


# --- expectations --------------------------------------------------------------------------


def build_suites(classes: list[str], params: ValidateParams, with_counts: bool) -> dict[str, list[Any]]:
    """The expectations for each table. Every column check is paired with a not-null check,
    because GX's between/in-set expectations skip nulls and NaN."""
    import great_expectations.expectations as gxe

    k = len(classes)
    images = [gxe.ExpectTableColumnsToMatchSet(column_set=IMAGE_COLUMNS + ["in_test_and_fit"], exact_match=True)]
    images += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in IMAGE_COLUMNS]
    images += [
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(dataio.SPLITS)),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(k))),
        gxe.ExpectColumnValuesToBeInSet(column="class_name", value_set=classes),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=32, max_value=32),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=32, max_value=32),
        gxe.ExpectColumnValuesToBeBetween(column="channels", min_value=3, max_value=3),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_min", min_value=0, max_value=255),
        gxe.ExpectColumnValuesToBeBetween(column="pixel_max", min_value=0, max_value=255),
        gxe.ExpectColumnValuesToBeBetween(
            column="pixel_std", min_value=params.min_pixel_std, strict_min=True,
            notes="blank (constant) images have a pixel std of 0",
        ),
        gxe.ExpectColumnValuesToBeInSet(
            column="in_test_and_fit", value_set=[False], notes="exact duplicates between test and train/val leak",
        ),
    ]
    low, high = (1 - params.balance_tolerance) / k, (1 + params.balance_tolerance) / k
    counts = [
        gxe.ExpectTableRowCountToEqual(value=len(dataio.SPLITS) * k),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("count", "share", "expected_count")],
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=1, notes="every class in every split"),
        gxe.ExpectColumnValuesToBeBetween(column="share", min_value=low, max_value=high, notes="class balance"),
    ]
    if with_counts:
        counts.append(gxe.ExpectColumnPairValuesToBeEqual(column_A="count", column_B="expected_count"))
    norm = [
        gxe.ExpectTableRowCountToEqual(value=3),
        gxe.ExpectColumnValuesToNotBeNull(column="mean"),
        gxe.ExpectColumnValuesToNotBeNull(column="std"),
        gxe.ExpectColumnValuesToBeBetween(column="mean", min_value=0, max_value=255),
        gxe.ExpectColumnValuesToBeBetween(column="std", min_value=params.min_channel_std, max_value=255),
    ]
    return {"images": images, "class_counts": counts, "normalization": norm}


def run_validation(tables: dict[str, pd.DataFrame], suites: dict[str, list[Any]]) -> dict:
    """Validate each table with its suite through a GX checkpoint, one per table, since each table
    is its own in-memory batch. No Data Docs: they load Bootstrap, jQuery and fonts from CDNs, so
    they render blank on an offline machine; validation.html shows every result instead."""
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    source = context.data_sources.add_pandas("prepared")
    results = {}
    for name, expectations in suites.items():
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
        definition = context.validation_definitions.add(gx.ValidationDefinition(data=batch, suite=suite, name=name))
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(name=name, validation_definitions=[definition], actions=[],
                          result_format={"result_format": "SUMMARY"})
        )
        outcome = checkpoint.run(batch_parameters={"dataframe": tables[name]})
        (result,) = outcome.run_results.values()
        results[name] = result.to_json_dict()
    return results


def failures(results: dict) -> list[str]:
    """One short line per failed expectation: table, expectation, column, what was wrong."""
    lines = []
    for table, result in results.items():
        for item in result["results"]:
            if item["success"]:
                continue
            cfg = item["expectation_config"]
            kwargs = {k: v for k, v in cfg["kwargs"].items() if k not in ("batch_id",)}
            res = item.get("result", {}) or {}
            detail = ""
            if "unexpected_count" in res:
                detail = f": {res['unexpected_count']} bad rows, e.g. {res.get('partial_unexpected_list', [])[:3]}"
            elif "observed_value" in res:
                detail = f": observed {res['observed_value']}"
            if item.get("exception_info", {}).get("raised_exception"):
                detail = f": {item['exception_info']['exception_message']}"
            lines.append(f"{table}: {cfg['type']} {kwargs}{detail}")
    return lines


def validate(
    images: pd.DataFrame, classes: list[str], norm: dict, params: ValidateParams, prepare: PrepareParams,
) -> tuple[dict, list[str]]:
    """GX results per table and the failures as short lines (empty when all passed)."""
    expected = expected_counts(params.expected_per_class, prepare)
    tables = {
        "images": with_leakage_flag(images),
        "class_counts": class_counts_table(images, classes, expected),
        "normalization": normalization_table(norm),
    }
    results = run_validation(tables, build_suites(classes, params, expected is not None))
    return results, failures(results)


def summarize(results: dict, conversions: list[dict]) -> dict:
    stats = {name: r["statistics"] for name, r in results.items()}
    return {
        "success": all(r["success"] for r in results.values()),
        "evaluated": sum(s["evaluated_expectations"] for s in stats.values()),
        "failed": sum(s["unsuccessful_expectations"] for s in stats.values()),
        "converted_images": len(conversions),  # resized or re-moded by prepare.convert_images
        "tables": stats,
    }


def main() -> None:
    paths = stage_paths("validate", "prepared", "out")
    prepared, out = paths["prepared"], paths["out"]
    params: ValidateParams = load_section("validate")
    prepare: PrepareParams = load_section("prepare")
    images = pd.read_csv(prepared / METADATA) if (prepared / METADATA).is_file() else None
    if images is None:
        raise DataError(f"{prepared / METADATA} not found; run `dvc repro prepare` first")
    classes = dataio.read_json(prepared / CLASSES)
    norm = dataio.read_json(prepared / NORMALIZATION)
    conversions = dataio.read_json(prepared / "conversions.json")

    with dataio.atomic_dir(out) as tmp:
        results, failed = validate(images, classes, norm, params, prepare)
        summary = summarize(results, conversions)
        dataio.write_json(tmp / VALIDATION["results"], results)
        dataio.write_json(tmp / VALIDATION["summary"], summary)
        verdict = "all passed" if not failed else f"{len(failed)} failed"
        page = f"# Data validation: {summary['evaluated']} expectations, {verdict}\n\n{validation_table(results)}\n"
        dataio.write_text(tmp / VALIDATION["page"], render_html(page, "CIFAR-10 data validation"))
    if failed:
        for line in failed:
            print(f"  FAILED {line}")
        raise DataError(
            f"validation failed: {len(failed)} of {summary['evaluated']} expectations "
            f"(first: {failed[0]}); see {out / VALIDATION['page']}, fix the data or the validate.* params"
        )
    converted = f" ({len(conversions)} images were converted by prepare)" if conversions else ""
    print(f"validate: all {summary['evaluated']} expectations passed{converted} -> {out}")


if __name__ == "__main__":
    run_main(main)

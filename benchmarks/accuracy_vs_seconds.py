"""Validation accuracy against cumulative training seconds, one line per run, from the per-epoch
outputs that gpu_recipe.py, ablation.py and default_vs_first.py write (JSON with `epochs`:
epoch, seconds, val_accuracy), raw or wrapped as measurement records (benchmarks/records.py).
Compare only records from one machine: the title names it.

    python benchmarks/accuracy_vs_seconds.py benchmarks/results/xeon-amx/2026-11-24/*.json \\
        --title "2-core Xeon, AMX" --out accuracy_vs_seconds.png
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from itertools import accumulate
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")  # files only
import matplotlib.pyplot as plt

from stages.common.errors import DataError, run_main


def is_epoch(row: object) -> bool:
    return isinstance(row, dict) and all(isinstance(row.get(key), (int, float)) for key in ("seconds", "val_accuracy"))


def read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot be read as JSON ({err}); pass the per-epoch records the benchmarks wrote") from None
    if isinstance(record, dict) and "record" in record and isinstance(record.get("figures"), dict):
        record = record["figures"]  # a measurement record: its figures are the benchmark's output
    if not isinstance(record, dict) or not isinstance(record.get("epochs"), list) or \
            not all(is_epoch(row) for row in record["epochs"]):
        raise DataError(f"{path}: not a per-epoch record (no `epochs` list of seconds and val_accuracy); pass "
                        "the JSON that gpu_recipe.py, ablation.py or default_vs_first.py wrote")
    if not record["epochs"]:
        raise DataError(f"{path}: the record has no epochs yet; plot it once its run has finished one")
    return record


def run_name(record: dict, path: Path) -> str:
    return record.get("preset") or record.get("variant") or path.stem


def labels(records: dict[Path, dict]) -> dict[Path, str]:
    """One legend entry per record. Records do not carry their widths or --set overrides, so two runs
    of one preset (say the default at two widths) would read alike: those are told apart by file name."""
    names = {path: run_name(record, path) for path, record in records.items()}
    repeated = {name for name, count in Counter(names.values()).items() if count > 1}
    entries = {}
    for path, name in names.items():
        shown = f"{name}, {path.stem}" if name in repeated and path.stem != name else name
        test = records[path].get("test_accuracy")
        entries[path] = f"{shown} (test {test:.4f})" if isinstance(test, float) else shown
    return entries


def plot(records: dict[Path, dict], title: str, out: Path) -> None:
    figure, axes = plt.subplots(figsize=(7, 4.2), dpi=110)
    for path, entry in labels(records).items():
        record = records[path]
        seconds = list(accumulate(row["seconds"] for row in record["epochs"]))
        axes.plot(seconds, [row["val_accuracy"] for row in record["epochs"]], marker=".", label=entry)
    axes.set(xlabel="training seconds", ylabel="validation accuracy (no TTA)", title=title)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="+")
    parser.add_argument("--title", required=True, help="the machine the records come from")
    parser.add_argument("--out", type=Path, default=Path("accuracy_vs_seconds.png"))
    args = parser.parse_args()
    records = {path: read_record(path) for path in args.records}  # all checked before anything is written
    plot(records, args.title, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)

"""Artifact paths have one home: dvc.yaml's `vars: paths:`. DVC passes each stage the paths it
reads and writes as options (`python -m stages.evaluate --prepared PATH ...`), and the
CLI, the flow and the benchmarks read the same mapping from dvc.yaml (`artifact_paths`).

The files inside a stage's folder that another stage, the CLI or the flow reads (manifest.json,
normalization.json, metrics.json, ...) are named once, below; a file only its own stage reads is
named in that stage's module.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stages.common.errors import ConfigError

DVC_YAML = "dvc.yaml"
# In the project, beside the pipeline's outputs: what the CLI writes of comparisons (compare's
# folders, the history page, each sweep's table, page and, by default, its study).
COMPARISONS_DIR = Path("comparisons")


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print its usage too: keep errors to one line
        raise ConfigError(f"{self.prog}: {message}; run it through `dvc repro` (dvc.yaml passes the paths)")


def stage_paths(stage: str, *names: str, argv: list[str] | None = None) -> dict[str, Path]:
    """The paths dvc.yaml gives a stage on its command line, each as `--name PATH`."""
    parser = _OneLineParser(prog=f"python -m stages.{stage}")
    for name in names:
        parser.add_argument(f"--{name}", type=Path, required=True)
    return vars(parser.parse_args(argv))


def artifact_paths(repo: Path) -> dict[str, Path]:
    """dvc.yaml's `paths` variables, relative to the repo: {"model": Path(...), "prepared": ...}."""
    import yaml

    path = repo / DVC_YAML
    try:
        declared = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path} cannot be read ({err}); run from the project root or pass --repo") from None
    for entry in declared.get("vars") or []:
        if isinstance(entry, dict) and isinstance(entry.get("paths"), dict):
            return {name: Path(value) for name, value in entry["paths"].items()}
    raise ConfigError(f"{path} declares no `vars: - paths:` mapping; restore it from the project's dvc.yaml")


# Files inside a stage's folder that other parts read, by what they hold.
MANIFEST = "manifest.json"  # in the raw folder: the archive, its checksums, its source's fingerprint
NORMALIZATION = "normalization.json"  # in the prepared folder: per-channel mean and std in pixel units
METADATA = "metadata.csv"  # in the prepared folder: one row per image, which validate checks
CLASSES = "classes.json"  # in the prepared folder: class names in label order
EVALUATION = {"metrics": "metrics.json", "report": "classification_report.json",
              "confusion": "confusion_matrix.csv", "predictions": "predictions.csv"}
# Great Expectations' results, every one shown, and the summary train reads (dvc.yaml names it too).
VALIDATION = {"results": "result.json", "page": "validation.html", "summary": "summary.json"}
EXPORT_METRICS = "metrics.json"  # in the export's results folder: the check of each format
RUN_INFO = "run_info.json"  # in the train folder
CURVES = "plots/metrics"  # in the train folder: DVCLive's per-epoch TSVs
REPORT_PAGE = "report.html"  # in the report folder


def split_file(split: str) -> str:
    """A prepared split's arrays (train, val, test), in the prepared folder."""
    return f"{split}.npz"


def evaluation_files(repo: Path) -> dict[str, str]:
    """Evaluate's outputs as repo-relative POSIX paths (how `git show` and `dvc exp show` name them)."""
    folder = artifact_paths(repo)["evaluate"].as_posix()
    return {what: f"{folder}/{name}" for what, name in EVALUATION.items()}

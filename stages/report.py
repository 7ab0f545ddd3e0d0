"""report: figures and one Markdown/HTML page with the run's metrics, per-class table and plots.

Reads train's folder (DVCLive curves, run info), evaluate's and the prepared test/train images;
writes report.md, report.html and its figures (PNG) into its own folder (dvc.yaml's paths.report).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from stages.common import dataio
from stages.common.errors import DataError, run_main
from stages.common.params import load_section
from stages.common.paths import (
    CLASSES,
    CURVES,
    EVALUATION,
    MANIFEST,
    REPORT_PAGE,
    RUN_INFO,
    VALIDATION,
    split_file,
    stage_paths,
)
from stages.common.provenance import code_revision, file_md5
from stages.common.render import per_class_table, render_html, validation_table
from stages.common.schemas import ReportParams
from stages.common.trial import refuse_pruned_model

# --- figures -------------------------------------------------------------------------------


def read_curves(curves_dir: Path) -> dict[str, pd.Series]:
    """{'train/accuracy': series by epoch, 'eval/loss': ...} from DVCLive's .tsv files."""
    curves = {}
    for path in sorted(curves_dir.glob("*/*.tsv")):
        table = pd.read_csv(path, sep="\t")
        curves[f"{path.parent.name}/{path.stem}"] = table.set_index("step")[path.stem]
    return curves


def plot_curves(curves: dict[str, pd.Series], dpi: int) -> plt.Figure:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=dpi)
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for split, label in (("train", "training"), ("eval", "validation")):
            series = curves.get(f"{split}/{metric}")
            if series is not None:
                ax.plot(series.index + 1, series.values, marker="o", label=label)
        ax.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_confusion(confusion: pd.DataFrame, split: str, dpi: int) -> plt.Figure:
    k = len(confusion)
    fig, ax = plt.subplots(figsize=(1 + 0.7 * k, 0.8 + 0.6 * k), dpi=dpi)
    values = confusion.to_numpy()
    ax.imshow(values, cmap="Blues")
    ax.set_xticks(range(k), confusion.columns, rotation=45, ha="right")
    ax.set_yticks(range(k), confusion.index)
    ax.set(xlabel="predicted", ylabel="actual", title=f"Confusion matrix ({split} split)")
    threshold = values.max() / 2 if values.size else 0
    for i in range(k):
        for j in range(k):
            ax.text(j, i, values[i, j], ha="center", va="center", fontsize=8,
                    color="white" if values[i, j] > threshold else "black")
    fig.tight_layout()
    return fig


def image_grid(images: np.ndarray, titles: list[str], columns: int, dpi: int) -> plt.Figure:
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows), dpi=dpi, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        ax.imshow(image)
        ax.set_title(title, fontsize=7)
    fig.tight_layout()
    return fig


def misclassified_examples(predictions: pd.DataFrame, limit: int) -> pd.DataFrame:
    return predictions[predictions["actual"] != predictions["predicted"]].head(limit)


def samples_per_class(labels: np.ndarray, classes: list[str], per_class: int) -> list[int]:
    """Indices of the first `per_class` images of each class, class by class."""
    return [int(i) for c in range(len(classes)) for i in np.flatnonzero(labels == c)[:per_class]]


# --- page ----------------------------------------------------------------------------------


def _machine(run_info: dict) -> str:
    """", AMD EPYC (avx2), float32": a training time means little without the CPU and the precision."""
    cpu, precision = run_info.get("cpu"), run_info.get("precision")
    if not cpu:  # a model trained before run_info named them
        return ""
    return f", {cpu['model']} ({', '.join(cpu['isa']) or 'no AVX2'}), {precision}"


def render_markdown(metrics: dict, report: dict, run_info: dict, figures: dict[str, str]) -> str:
    headline = "\n".join(f"| {k} | {v} |" for k, v in metrics.items())
    lines = [
        "# CIFAR-10 pipeline report",
        "",
        (f"Model `{run_info.get('model', '?')}` trained on {run_info.get('device', '?')}{_machine(run_info)} "
        f"in {run_info.get('seconds', '?')} s ({run_info.get('parameters', '?'):,} parameters)."),
        "",
        f"## Metrics on the {run_info.get('split', 'test')} split",
        "",
        "| metric | value |",
        "|---|---:|",
        headline,
        "",
        "## Per class",
        "",
        per_class_table(report),
        "",
    ]
    for title, file in figures.items():
        lines += [f"## {title}", "", f"![{title}]({file})", ""]
    return "\n".join(lines)


def model_card(manifest: dict, train_params: dict, metrics: dict, model_path: Path, model_md5: str,
               revision: str) -> str:
    """Which data, params, code and metrics produced the model, so it can be traced back."""
    params = ", ".join(f"{k}={v}" for k, v in train_params.items())
    return "\n".join([
        "## Model card",
        "",
        f"- model file: `{model_path}` (md5 `{model_md5}`)",
        f"- data: `{manifest.get('source')}` (sha256 `{manifest.get('sha256')}`, {manifest.get('layout')})",
        f"- train params: {params}",
        f"- code revision: `{revision}`",
        f"- metrics: accuracy {metrics.get('accuracy')}, macro F1 {metrics.get('f1_macro')}, loss {metrics.get('loss')}",
        "",
    ])


# --- stage ---------------------------------------------------------------------------------


def main() -> None:
    paths = stage_paths("report", "raw", "prepared", "validate", "model", "train", "evaluate", "out")
    prepared, train_dir, evaluate_dir = paths["prepared"], paths["train"], paths["evaluate"]
    params: ReportParams = load_section("report")
    classes = dataio.read_json(prepared / CLASSES)
    metrics = dataio.read_json(evaluate_dir / EVALUATION["metrics"])
    refuse_pruned_model(metrics, evaluate_dir / EVALUATION["metrics"])
    # The split the metrics were computed on, not today's evaluate.split.
    split = metrics.get("split")
    if split not in ("test", "val"):
        raise DataError(f"{evaluate_dir / EVALUATION['metrics']} does not say which split it evaluated; "
                        "rerun `dvc repro -f evaluate`")
    report = dataio.read_json(evaluate_dir / EVALUATION["report"])
    run_info = {**dataio.read_json(train_dir / RUN_INFO), **_trained_model(train_dir)}
    if not (evaluate_dir / EVALUATION["predictions"]).is_file():
        raise DataError(f"{evaluate_dir / EVALUATION['predictions']} not found; run `dvc repro evaluate` first")
    predictions = pd.read_csv(evaluate_dir / EVALUATION["predictions"])
    confusion = pd.read_csv(evaluate_dir / EVALUATION["confusion"], index_col=0)
    eval_images, _ = dataio.load_split(prepared / split_file(split))
    train_images, train_labels = dataio.load_split(prepared / split_file("train"))

    wrong = misclassified_examples(predictions, params.misclassified)
    samples = samples_per_class(train_labels, classes, params.samples_per_class)
    figures = {
        "Training curves": ("curves.png", plot_curves(read_curves(train_dir / CURVES), params.dpi)),
        "Confusion matrix": ("confusion_matrix.png", plot_confusion(confusion, split, params.dpi)),
        f"Misclassified {split} images (true / predicted / probability)": (
            "misclassified.png",
            image_grid(eval_images[wrong["index"].to_numpy()],
                       [f"{a} / {p} / {q:.2f}" for a, p, q in wrong[["actual", "predicted", "probability"]].itertuples(index=False)],
                       columns=8, dpi=params.dpi),
        ),
        "Training images per class": (
            "samples.png",
            image_grid(train_images[samples], [classes[train_labels[i]] for i in samples],
                       columns=params.samples_per_class, dpi=params.dpi),
        ),
    }
    with dataio.atomic_dir(paths["out"]) as tmp:
        for file, fig in figures.values():
            fig.savefig(tmp / file)
            plt.close(fig)
        md_text = render_markdown(metrics, report, {**run_info, "split": split},
                                  {t: f for t, (f, _) in figures.items()})
        md_text += "\n" + model_card(dataio.read_json(paths["raw"] / MANIFEST), _train_params(train_dir), metrics,
                                     paths["model"], file_md5(paths["model"]), code_revision())
        validation = dataio.read_json(paths["validate"] / VALIDATION["results"])
        md_text += "\n## Data validation (Great Expectations)\n\n" + validation_table(validation) + "\n"
        (tmp / "report.md").write_text(md_text)
        (tmp / REPORT_PAGE).write_text(render_html(md_text))
    print(f"report: {paths['out'] / REPORT_PAGE} and report.md, {len(figures)} figures")


def _train_params(train_dir: Path) -> dict:
    """The train params DVCLive logged with the run."""
    import yaml

    path = train_dir / "params.yaml"
    return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}


def _trained_model(train_dir: Path) -> dict:
    return {"model": _train_params(train_dir).get("model")}


if __name__ == "__main__":
    run_main(main)

from pathlib import Path

import numpy as np
import pandas as pd

from stages.common.render import render_html
from stages.report import (
    image_grid,
    misclassified_examples,
    plot_confusion,
    read_curves,
    render_markdown,
    samples_per_class,
)


def test_curves_are_read_from_dvclive_files(tmp_path):
    for split in ("train", "eval"):
        (tmp_path / split).mkdir()
        pd.DataFrame({"step": [0, 1], "accuracy": [0.3, 0.5]}).to_csv(tmp_path / split / "accuracy.tsv", sep="\t", index=False)
    curves = read_curves(tmp_path)
    assert set(curves) == {"train/accuracy", "eval/accuracy"} and curves["eval/accuracy"].tolist() == [0.3, 0.5]


def test_misclassified_and_samples_selection():
    predictions = pd.DataFrame({"index": [0, 1, 2, 3], "actual": ["a", "b", "a", "b"], "predicted": ["a", "a", "b", "b"],
                                "probability": [0.9, 0.6, 0.7, 0.8]})
    assert misclassified_examples(predictions, 1)["index"].tolist() == [1]
    assert samples_per_class(np.array([1, 0, 1, 0, 0]), ["a", "b"], 2) == [1, 3, 0, 2]


def test_page_has_metrics_per_class_table_and_figures():
    report = {name: {"precision": 0.5, "recall": 0.25, "f1-score": 1 / 3, "support": 4} for name in ["a", "b", "macro avg", "weighted avg"]}
    md = render_markdown({"accuracy": 0.75}, report, {"model": "m", "device": "CPU", "seconds": 3, "parameters": 1234},
                         {"Confusion matrix": "confusion_matrix.png"})
    assert "| accuracy | 0.75 |" in md and "| a | 0.5000 | 0.2500 | 0.3333 | 4 |" in md
    assert "![Confusion matrix](confusion_matrix.png)" in md and "1,234 parameters" in md
    assert "trained on CPU in 3 s" in md  # a model trained before run_info named the CPU
    named = render_markdown({"accuracy": 0.75}, report, {"model": "m", "device": "CPU", "seconds": 3, "parameters": 1,
                                                         "cpu": {"model": "AMD EPYC", "isa": ["avx2"]},
                                                         "precision": "float32"}, {})
    assert "trained on CPU, AMD EPYC (avx2), float32 in 3 s" in named
    html = render_html(md)
    assert "<table>" in html and '<img alt="Confusion matrix" src="confusion_matrix.png"' in html


def test_figures_render(tmp_path):
    fig = plot_confusion(pd.DataFrame([[3, 1], [0, 4]], index=["a", "b"], columns=["a", "b"]), "test", dpi=50)
    fig.savefig(tmp_path / "c.png")
    grid = image_grid(np.zeros((3, 32, 32, 3), np.uint8), ["x", "y", "z"], columns=2, dpi=50)
    grid.savefig(tmp_path / "g.png")
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "g.png").stat().st_size > 0


def test_model_card_traces_data_params_code_and_metrics():
    from stages.report import model_card

    card = model_card({"source": "x.tar.gz", "sha256": "abc", "layout": "class-folders"}, {"model": "m", "epochs": 3},
                      {"accuracy": 0.7, "f1_macro": 0.69, "loss": 0.9}, Path("models/m.keras"), "d41d8", "1234abcd")
    for fact in ("md5 `d41d8`", "sha256 `abc`", "model=m, epochs=3", "`1234abcd`", "accuracy 0.7"):
        assert fact in card

from stages.common.render import per_class_table, render_html, report_classes

REPORT = {
    "cat": {"precision": 0.5, "recall": 0.25, "f1-score": 1 / 3, "support": 4},
    "dog": {"precision": 1.0, "recall": 0.75, "f1-score": 6 / 7, "support": 4},
    "accuracy": 0.5,
    "macro avg": {"precision": 0.75, "recall": 0.5, "f1-score": 0.6, "support": 8},
    "weighted avg": {"precision": 0.75, "recall": 0.5, "f1-score": 0.6, "support": 8},
}


def test_report_classes_leave_out_accuracy_and_averages():
    assert report_classes(REPORT) == ["cat", "dog"]


def test_per_class_table_has_a_row_per_class_and_average():
    rows = per_class_table(REPORT).splitlines()
    assert rows[2] == "| cat | 0.5000 | 0.2500 | 0.3333 | 4 |"
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| cat", "| dog", "| macro avg", "| weighted avg"]


def test_html_page_escapes_its_title_and_renders_tables():
    page = render_html(per_class_table(REPORT), title="a <b> run")
    assert "<title>a &lt;b&gt; run</title>" in page and "<table>" in page

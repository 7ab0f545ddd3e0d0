"""Page helpers shared by the report stage, `compare` and the flow's artifacts: plain Markdown and
HTML, no plotting library, so the flow and `compare` start without matplotlib."""

from __future__ import annotations

import html


def report_classes(report: dict) -> list[str]:
    """The class names of a scikit-learn classification report (its averages and accuracy left out)."""
    return [name for name, row in report.items() if isinstance(row, dict) and "avg" not in name]


def per_class_table(report: dict) -> str:
    rows = ["| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for name in [*report_classes(report), "macro avg", "weighted avg"]:
        r = report[name]
        rows.append(f"| {name} | {r['precision']:.4f} | {r['recall']:.4f} | {r['f1-score']:.4f} | {int(r['support'])} |")
    return "\n".join(rows)


def validation_table(results: dict) -> str:
    """Every Great Expectations result of the validate stage (its result.json): table,
    expectation, arguments, pass/fail and what was observed, as a Markdown table."""
    rows = ["| table | expectation | arguments | result | observed |", "|---|---|---|---|---|"]
    for table, result in results.items():
        for item in result["results"]:
            config = item["expectation_config"]
            arguments = ", ".join(f"{k}={v}" for k, v in config["kwargs"].items() if k != "batch_id")
            outcome = item.get("result") or {}
            if "observed_value" in outcome and outcome["observed_value"] is not None:
                observed = str(outcome["observed_value"])
            elif "unexpected_count" in outcome:
                observed = f"{outcome['unexpected_count']} of {outcome.get('element_count')} rows unexpected"
            else:
                observed = ""
            if (item.get("exception_info") or {}).get("raised_exception"):
                observed = item["exception_info"]["exception_message"]
            cells = [table, config["type"], arguments, "pass" if item["success"] else "**FAIL**", observed]
            rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(rows)


def render_html(md_text: str, title: str = "CIFAR-10 report") -> str:
    import markdown

    body = markdown.markdown(md_text, extensions=["tables"])
    style = "body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}" \
            "td,th{border:1px solid #ccc;padding:2px 8px}img{max-width:100%}"
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>" \
           f"<style>{style}</style></head><body>{body}</body></html>\n"

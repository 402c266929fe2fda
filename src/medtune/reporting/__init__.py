"""Placeholder until the real report lands: a plain report.md and an HTML page from pipeline_results.json."""

from __future__ import annotations

import html
from pathlib import Path


def write_pipeline_report(output_dir: Path, results: dict) -> tuple[Path, Path]:
    lines = ["# medtune pipeline report", ""]
    if results.get("random_weights"):
        lines += ["The base model is the embedded tiny model with random weights: these numbers mean nothing.", ""]
    lines += ["| model | CMB-Exam | safety | ROUGE-L | perplexity |", "|---|---|---|---|---|"]
    cells = (("cmb_exam", "overall"), ("safety", "overall"), ("clin", "rouge_l"), ("perplexity", "perplexity"))
    for name, measures in results.get("evaluations", {}).items():
        values = [measures.get(measure, {}).get(key) for measure, key in cells]
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" if isinstance(v, (int, float)) else "–" for v in values)
                     + " |")
    markdown = Path(output_dir) / "report.md"
    markdown.write_text("\n".join(lines) + "\n", encoding="utf-8")
    page = Path(output_dir) / "report.html"
    page.write_text(f"<!doctype html><meta charset='utf-8'><pre>{html.escape(markdown.read_text(encoding='utf-8'))}"
                    "</pre>", encoding="utf-8")
    return page, markdown

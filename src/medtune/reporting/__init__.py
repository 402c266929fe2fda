"""Reports people read: `write_pipeline_report` turns a pipeline's results dictionary into report.html (one
self-contained file, charts inline) and report.md. It reads only that dictionary, never the stage folders."""

from __future__ import annotations

from pathlib import Path

from medtune.reporting.content import build_report
from medtune.reporting.document import build_document
from medtune.reporting.render import to_html, to_markdown


def write_pipeline_report(output_dir: Path, results: dict) -> tuple[Path, Path]:
    """Write `output_dir/report.html` and `output_dir/report.md` from `pipeline_results.json`'s dictionary and
    return their paths. Missing parts (a skipped stage, no generate mode) are shown as '–' or left out with a note."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(results)
    html_path, md_path = output_dir / "report.html", output_dir / "report.md"
    html_path.write_text(to_html(report.title, build_document(report, charts=True)), encoding="utf-8")
    md_path.write_text(to_markdown(report.title, build_document(report, charts=False)), encoding="utf-8")
    return html_path, md_path


__all__ = ["write_pipeline_report"]

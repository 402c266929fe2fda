"""The report as an ordered list of sections of text, tables and charts; HTML and markdown render the same list."""

from __future__ import annotations

from dataclasses import dataclass, field

from medtune.charts import Chart
from medtune.reporting import figures
from medtune.reporting.content import STAGE_TITLES, Report, item_sets
from medtune.reporting.tables import (
    Table,
    comparison_table,
    contaminated_table,
    data_table,
    key_value_table,
    models_table,
    safety_table,
    scrub_files_table,
    training_table,
    wall_time_table,
)

RANDOM_WEIGHTS_WARNING = (
    "These numbers mean nothing. The model is the embedded tiny default: randomly initialised, a few million "
    "parameters, trained for a few steps on the bundled sample. This report only shows that the machinery works "
    "end to end; run `medtune pipeline --model_name_or_path MODEL` on a real model for results worth reading.")


@dataclass
class Text:
    text: str
    style: str = "p"  # "p", "note" (a quieter aside), "warning" (the reader must see it)


@dataclass
class Heading:
    text: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


def build_document(report: Report, charts: bool) -> list[Section]:
    """Sections in reading order; `charts=False` leaves the charts out (markdown), which also skips drawing them."""
    sections = [overview(report), comparison(report, charts), safety(report), training(report, charts),
                data(report, charts)]
    if report.data_safety:
        sections.append(data_safety(report))
    sections.append(wall_time(report))
    return sections


def _noted(section: Section, note: str) -> Section:
    """The section with only a note saying why it is empty."""
    section.blocks.append(Text(note, "note"))
    return section


def overview(report: Report) -> Section:
    section = Section("overview", "Overview")
    if report.random_weights:
        section.blocks.append(Text(RANDOM_WEIGHTS_WARNING, "warning"))
    facts = [f"base model: {report.base_model or '–'}", f"created: {report.created or '–'}",
             f"output folder: {report.output_dir or '–'}"]
    section.blocks.append(Text(" · ".join(facts)))
    if report.models:
        section.blocks.append(models_table(report))
    if report.skipped:
        skipped = ", ".join(STAGE_TITLES[s] for s in report.skipped)
        section.blocks.append(Text(f"Not run in this pipeline, so absent from every table: {skipped}.", "note"))
    return section


def comparison(report: Report, charts: bool) -> Section:
    section = Section("models", "Models compared")
    if not report.measures:
        return _noted(section, "No evaluation results in this run.")
    section.blocks += [
        Text(_same_items(report) + "Δ columns give the change from the model to their left (percentage points for accuracies); the last column the change from the first model to the "
             "last. Accuracy is the mean over exam types, as the CMB leaderboard averages; chance is what uniform "
             "random guessing scores on the same items."),
        comparison_table(report)]
    if report.missing_measures:
        section.blocks.append(Text("Not evaluated in this run: " + "; ".join(report.missing_measures) + ".", "note"))
    if charts:
        section.blocks += [c for c in (figures.exam_type_chart(report), figures.exam_sets_chart(report),
                                       figures.generation_metrics_chart(report)) if c is not None]
    return section


def _same_items(report: Report) -> str:
    """What the evaluations show about the items each model answered, from their item ids; nothing when they do
    not list them."""
    verdicts = item_sets(report.model_names, report.evaluations)
    differing = [label for label, same in verdicts.items() if same is False]
    if differing:
        return f"Not every model answered the same items in: {', '.join(differing)}; compare those with care. "
    if verdicts and all(verdicts.values()):
        return "Every model answered the same items (the same item ids in every set). "
    return ""


def safety(report: Report) -> Section:
    section = Section("safety", "Drug-safety answers that changed")
    comparison = report.safety
    if comparison is None:
        return _noted(section, "No drug-safety items to compare (the probe needs the base model and at least one "
                               "later model).")
    fixed = sum(c.verdict == "fixed" for c in comparison.changes)
    broken = sum(c.verdict == "broken" for c in comparison.changes)
    section.blocks.append(Text(
        f"{len(comparison.changes)} of {comparison.compared} probe items got a different answer from "
        f"{comparison.after_model} than from {comparison.before_model}: {fixed} now right, {broken} now wrong, "
        f"{len(comparison.changes) - fixed - broken} changed but still wrong."))
    if comparison.changes:
        section.blocks.append(safety_table(comparison))
    return section


def training(report: Report, charts: bool) -> Section:
    section = Section("training", "Training")
    if not report.training:
        return _noted(section, "No training stage ran.")
    section.blocks.append(training_table(report))
    for stage in report.training:
        if not stage.log_history:
            section.blocks.append(Text(f"{stage.name}: no logged steps.", "note"))
        elif charts:
            section.blocks += [Heading(STAGE_TITLES.get(stage.name, stage.name)), *figures.training_charts(stage)]
    return section


def data(report: Report, charts: bool) -> Section:
    section = Section("data", "Training data")
    if not report.data:
        return _noted(section, "No training data recorded.")
    section.blocks += [Text("Records each stage read, records dropped and why, and token lengths per record."),
                       data_table(report)]
    if charts:
        for entry in report.data:
            chart = figures.token_length_chart(entry)
            if chart is not None:
                chart.caption = f"{entry.stage}: {entry.file}"  # the file name in full, in any script
                section.blocks.append(chart)
    return section


def data_safety(report: Report) -> Section:
    """Each data step's summary as key/value rows; the pipeline's per-file scrub counts and contaminated items
    (DATA_SAFETY_TABLES) as tables of their own."""
    section = Section("data-safety", "Data safety")
    for name, summary in report.data_safety.items():
        section.blocks.append(Heading(str(name)))
        tables = {key: table(summary[key]) for key, table in DATA_SAFETY_TABLES.items()
                  if isinstance(summary, dict) and key in summary}
        tables = {key: table for key, table in tables.items() if table is not None}
        rest = {k: v for k, v in summary.items() if k not in tables} if isinstance(summary, dict) else summary
        section.blocks += [key_value_table(rest), *tables.values()]
    return section


DATA_SAFETY_TABLES = {"files": scrub_files_table, "contaminated": contaminated_table}


def wall_time(report: Report) -> Section:
    section = Section("time", "Wall time per stage")
    if not report.wall_times:
        return _noted(section, "No timings recorded.")
    section.blocks.append(wall_time_table(report))
    return section


__all__ = ["Chart", "Heading", "Section", "Table", "Text", "build_document"]

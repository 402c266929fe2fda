"""The report's tables as plain text cells, shared by the HTML and the markdown renderers."""

from __future__ import annotations

from dataclasses import dataclass, field

from medtune.reporting.content import (
    MISSING,
    Measure,
    Report,
    SafetyComparison,
    flatten,
    format_delta,
    format_number,
    format_seconds,
)


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)
    numeric: set[int] = field(default_factory=set)  # columns to right-align
    # (row, column) -> "better" / "worse": how the HTML colours a change
    tones: dict[tuple[int, int], str] = field(default_factory=dict)


def comparison_table(report: Report) -> Table:
    """Every model x every measure; after each later model the change from the one before, and base -> final."""
    names = report.model_names
    headers = ["measure", "chance"]
    for index, name in enumerate(names):
        headers += [name] if index == 0 else [name, f"Δ {name}"]
    total = len(names) > 2
    if total:
        headers.append(f"Δ {names[0]}→{names[-1]}")
    table = Table(headers, numeric=set(range(1, len(headers))))
    for row_index, measure in enumerate(report.measures):
        chance = measure.chance * 100 if measure.chance is not None and measure.unit == "%" else measure.chance
        row = [_measure_label(measure), format_number(chance, measure.digits)]
        for index, (value, delta) in enumerate(zip(measure.shown(), measure.deltas())):
            row.append(format_number(value, measure.digits))
            if index:
                _tone(table, row_index, len(row), delta, measure)
                row.append(format_delta(delta, measure.digits))
        if total:
            _tone(table, row_index, len(row), measure.total_delta(), measure)
            row.append(format_delta(measure.total_delta(), measure.digits))
        table.rows.append(row)
    return table


def _measure_label(measure: Measure) -> str:
    if measure.unit == "%":
        return f"{measure.name} (%)"
    return f"{measure.name} (lower is better)" if measure.lower_is_better else measure.name


def _tone(table: Table, row: int, column: int, delta: float | None, measure: Measure) -> None:
    if delta:
        table.tones[(row, column)] = "better" if (delta < 0) == measure.lower_is_better else "worse"


def models_table(report: Report) -> Table:
    return Table(["model", "weights"], [[m["name"], str(m.get("path", "") or MISSING)] for m in report.models])


def training_table(report: Report) -> Table:
    table = Table(["stage", "steps", "train loss", "last logged loss", "last eval loss", "last reward accuracy",
                   "last reward margin", "wall time", "peak RSS (MB)"], numeric=set(range(1, 9)))
    for stage in report.training:
        table.rows.append([stage.name, format_number(stage.steps), format_number(stage.train_loss, 4),
                           format_number(stage.last("loss"), 4), format_number(stage.last("eval_loss"), 4),
                           format_number(stage.last("rewards/accuracies"), 3),
                           format_number(stage.last("rewards/margins"), 3), format_seconds(stage.wall_s),
                           format_number(stage.peak_rss_mb, 0)])
    return table


def safety_table(comparison: SafetyComparison) -> Table:
    table = Table(["id", "question", "options", "correct", comparison.before_model, comparison.after_model,
                   "change"])
    for change in comparison.changes:
        options = "\n".join(f"{letter}. {text}" for letter, text in change.options.items())
        table.rows.append([change.id, change.question, options, change.answer,
                           _marked(change.before, change.before_correct), _marked(change.after, change.after_correct),
                           change.verdict])
    return table


def _marked(given: str, correct: bool) -> str:
    return f"{given or '(none)'} {'✓' if correct else '✗'}"


def data_table(report: Report) -> Table:
    table = Table(["stage", "file", "kind", "records", "dropped", "tokens min", "median", "mean", "max"],
                  numeric={3, 5, 6, 7, 8})
    for entry in report.data:
        summary = entry.length_summary() or {}
        dropped = "; ".join(f"{reason}: {count}" for reason, count in entry.dropped.items() if count) or "none"
        table.rows.append([entry.stage, entry.file, entry.kind, format_number(entry.records), dropped,
                           *(format_number(summary.get(k), 1 if k in ("median", "mean") else 0)
                             for k in ("min", "median", "mean", "max"))])
    return table


def scrub_files_table(files) -> Table | None:
    """{file: {"records": n, kind: count, ...}} -> one row per file, one column per kind found anywhere; None for
    any other shape (shown as key/value rows instead)."""
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return None
    kinds = list(dict.fromkeys(k for counts in files.values() for k in counts if k != "records"))
    table = Table(["file", "records", *kinds], numeric=set(range(1, len(kinds) + 2)))
    for path, counts in files.items():
        table.rows.append([path, *(str(counts.get(k, 0)) for k in ("records", *kinds))])
    return table


def contaminated_table(items) -> Table | None:
    """[{"id", "eval_file", "matches": [{"train": "file:line", "overlap"}]}] -> one row per training record holding
    an evaluation item; None for any other shape."""
    if not isinstance(items, list) or not all(isinstance(i, dict) and "matches" in i for i in items):
        return None
    table = Table(["eval id", "eval file", "training record", "overlap"], numeric={3})
    for item in items:
        for match in item["matches"]:
            table.rows.append([str(item.get("id")), str(item.get("eval_file")), str(match.get("train")),
                               _plain(match.get("overlap"))])
    return table


def key_value_table(value) -> Table:
    return Table(["key", "value"], [[key or "(value)", _plain(leaf)] for key, leaf in flatten(value)])


def _plain(value) -> str:
    return format_number(value, 4) if isinstance(value, float) else str(value)


def wall_time_table(report: Report) -> Table:
    total = sum(report.wall_times.values())
    table = Table(["stage", "wall time", "share"], numeric={1, 2})
    for stage, seconds in report.wall_times.items():
        table.rows.append([stage, format_seconds(seconds), f"{100 * seconds / total:.1f}%" if total else MISSING])
    if len(report.wall_times) > 1:
        table.rows.append(["total", format_seconds(total), "100.0%"])
    return table

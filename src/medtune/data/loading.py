"""Load files of any supported format into internal records, validating every record first.

`load_records(location, kind)` returns the converted records or raises one `DataError` listing every problem
as `file:line: field: message` — always before a model is touched.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from medtune.data.readers import (
    JSON_SUFFIXES,
    TEXT_SUFFIXES,
    list_data_files,
    raise_if_problems,
    read_json_records,
    read_text_lines,
)
from medtune.data.records import FORMAT_KEYS, FORMAT_KIND, RecordProblem, TextDocument, convert, detect_format
from medtune.errors import DataError, Problem

KIND_SUFFIXES = {"text": TEXT_SUFFIXES + JSON_SUFFIXES, "sft": JSON_SUFFIXES, "preference": JSON_SUFFIXES,
                 "exam": JSON_SUFFIXES, "clin": JSON_SUFFIXES, "answers": JSON_SUFFIXES}
KIND_COMMAND = {"text": "medtune pt", "sft": "medtune sft", "preference": "medtune dpo",
                "exam": "medtune eval cmb-exam", "clin": "medtune eval cmb-clin", "answers": "medtune eval cmb-score"}


@dataclass
class FileReport:
    """What one file held: its format and how many records were read."""

    path: str
    format: str
    records: int = 0
    problems: list[Problem] = field(default_factory=list)


def _file_format(records: list[tuple[int, object]], forced: str | None) -> str | None:
    if forced:
        return forced
    for _, record in records:
        fmt = detect_format(record)
        if fmt:
            return fmt
    return None


def empty_file_problem(path: Path) -> Problem:
    """An input file with no record at all is a mistake (a failed export, the wrong file), never skipped quietly."""
    return Problem(str(path), None, None, "no records: the file is empty (or holds only whitespace or [])")


def records_location(records) -> str:
    """The file the records came from, or the folder holding all their files (for messages about all of them)."""
    # sources are "file:line", or "dataset[row N]" for hub datasets
    files = sorted({str(r.source).rsplit(":", 1)[0].split("[row ", 1)[0] for r in records if getattr(r, "source", "")})
    if len(files) == 1:
        return files[0]
    return os.path.commonpath(files) if files else "the input data"


def require_records(kept, read, message: str) -> None:
    """Stop with one line naming where `read` came from when nothing of it is `kept` to train or evaluate on.

    Stages call this after every step that can discard records (length limits, identical pairs, block grouping),
    so an empty result is an error that says why instead of an IndexError deep inside a trainer.
    """
    if not kept:
        raise DataError([Problem(records_location(read), None, None, message)])


def read_file(path: Path, kind: str | None, data_format: str | None = None) -> tuple[list, FileReport]:
    """Convert one file's records; `kind` None accepts any format (used by `medtune data check`)."""
    problems: list[Problem] = []
    if path.suffix.lower() in TEXT_SUFFIXES:
        items = [TextDocument(text, f"{path}:{line}") for line, text in read_text_lines(path, problems)]
        report = FileReport(str(path), "text", len(items), problems)
        if not items and not problems:
            problems.append(empty_file_problem(path))
        if kind not in (None, "text"):
            report.problems.append(Problem(str(path), None, None, f"plain text cannot be used by {KIND_COMMAND[kind]}"))
        return items, report

    raw = list(read_json_records(path, problems))
    if not raw and not problems:
        problems.append(empty_file_problem(path))
    fmt = _file_format(raw, data_format)
    report = FileReport(str(path), fmt or "unknown", 0, problems)
    if fmt is None:
        if raw:
            line, first = raw[0]
            found = ", ".join(sorted(first)) if isinstance(first, dict) else type(first).__name__
            known = "; ".join(f"{name}: {'+'.join(keys)}" for name, keys in FORMAT_KEYS.items())
            problems.append(Problem(str(path), line, None, f"unrecognised record (fields: {found}); expected one of "
                                                           f"{known}"))
        return [], report
    if kind is not None and FORMAT_KIND[fmt] != kind:
        problems.append(Problem(str(path), raw[0][0] if raw else None, None,
                                f"holds {fmt} records, which are for {KIND_COMMAND[FORMAT_KIND[fmt]]}, not "
                                f"{KIND_COMMAND[kind]}"))
        return [], report
    items = []
    for line, record in raw:
        try:
            item = convert(record, fmt)
        except RecordProblem as exc:
            problems.append(Problem(str(path), line, exc.field, exc.message))
            continue
        item.source = f"{path}:{line}"
        items.append(item)
    report.records = len(items)
    problems.sort(key=lambda p: p.line or 0)
    return items, report


def load_records(location: str | Path, kind: str, data_format: str | None = None) -> tuple[list, list[FileReport]]:
    """All records of `kind` (text, sft or preference) under `location`; raises DataError listing every problem."""
    items, reports = [], []
    for path in list_data_files(location, KIND_SUFFIXES[kind]):
        file_items, report = read_file(path, kind, data_format)
        items += file_items
        reports.append(report)
    raise_if_problems([p for r in reports for p in r.problems])
    return items, reports


def split_records(records: list, percentage: float, seed: int = 42) -> tuple[list, list]:
    """Hold out `percentage` of whole records (documents, conversations, pairs), chosen by a fixed seed."""
    if percentage <= 0 or len(records) < 2:
        return records, []
    count = min(len(records) - 1, max(1, round(len(records) * percentage / 100)))
    held_out = set(random.Random(seed).sample(range(len(records)), count))
    train = [r for i, r in enumerate(records) if i not in held_out]
    return train, [r for i, r in enumerate(records) if i in held_out]

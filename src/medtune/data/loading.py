"""Load files of any supported format into internal records, validating every record first.

`load_records(location, kind)` returns the converted records or raises one `DataError` listing every problem
as `file:line: field: message` — always before a model is touched.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

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


class FileRecord(NamedTuple):
    """One record of a file: the line it starts on, its position among the file's records (0-based: a .json array
    written on one line has every record on line 1), the record as read, and as converted."""

    line: int
    index: int
    raw: Any
    record: Any


def unrecognised_problem(path: Path, line: int, record: Any) -> Problem:
    found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
    known = "; ".join(f"{name}: {'+'.join(keys)}" for name, keys in FORMAT_KEYS.items())
    return Problem(str(path), line, None, f"unrecognised record (fields: {found}); expected one of {known}")


def iter_file_records(path: Path, report: FileReport, kind: str | None = None,
                      data_format: str | None = None) -> Iterator[FileRecord]:
    """Stream one file's converted records, one in memory at a time (a .json array is parsed whole).

    The file's format is `data_format`, else that of its first recognisable record; `kind` None accepts any
    format. Problems go to `report.problems` (a record that does not convert is one, at its line), the format and
    the count of records to `report`."""
    problems = report.problems
    if path.suffix.lower() in TEXT_SUFFIXES:
        report.format = "text"
        if kind not in (None, "text"):
            problems.append(Problem(str(path), None, None, f"plain text cannot be used by {KIND_COMMAND[kind]}"))
            return
        for index, (line, text) in enumerate(read_text_lines(path, problems)):
            report.records += 1
            yield FileRecord(line, index, text, TextDocument(text, f"{path}:{line}"))
        if not report.records and not problems:
            problems.append(empty_file_problem(path))
        return
    fmt, waiting, seen = data_format, [], 0
    for index, (line, raw) in enumerate(read_json_records(path, problems)):
        seen += 1
        if fmt is None:
            fmt = detect_format(raw)
            if fmt is None:
                waiting.append((line, index, raw))  # converted (and reported) once a later record shows the format
                continue
        if report.format == "unknown":
            report.format = fmt
            if kind is not None and FORMAT_KIND[fmt] != kind:
                problems.append(Problem(str(path), (waiting or [(line,)])[0][0], None,
                                        f"holds {fmt} records, which are for {KIND_COMMAND[FORMAT_KIND[fmt]]}, not "
                                        f"{KIND_COMMAND[kind]}"))
                return
        for number, position, pending in [*waiting, (line, index, raw)]:
            try:
                record = convert(pending, fmt)
            except RecordProblem as exc:
                problems.append(Problem(str(path), number, exc.field, exc.message))
                continue
            record.source = f"{path}:{number}"
            report.records += 1
            yield FileRecord(number, position, pending, record)
        waiting = []
    if waiting:
        problems.append(unrecognised_problem(path, waiting[0][0], waiting[0][2]))
    if not seen and not problems:
        problems.append(empty_file_problem(path))


def read_file(path: Path, kind: str | None, data_format: str | None = None) -> tuple[list, FileReport]:
    """Convert one file's records; `kind` None accepts any format (used by `medtune data check`)."""
    report = FileReport(str(path), "unknown")
    items = [entry.record for entry in iter_file_records(path, report, kind, data_format)]
    report.problems.sort(key=problem_line)
    return items, report


def file_problems(path: Path, kind: str) -> list[Problem]:
    """Every problem of one file, in line order as `read_file` lists them, without keeping its records: memory
    holds one record at a time (a .json array is parsed whole), so a file larger than memory can be checked."""
    report = FileReport(str(path), "unknown")
    for _ in iter_file_records(path, report, kind):
        pass
    return sorted(report.problems, key=problem_line)


def problem_line(problem: Problem) -> int:
    # a record whose format shows only later in the file is converted (and reported) late: order by line
    return problem.line or 0


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

"""`medtune data convert --from ceval|cmmlu IN... --output FILE.json`: general-knowledge exams as CMB-Exam items.

The forgetting check evaluates a general-knowledge set next to the medical ones; users have C-Eval and CMMLU as
one CSV per subject. Both layouts become the CMB-Exam schema `medtune eval cmb-exam --data_dir FILE.json` reads:

- C-Eval: `id,question,A,B,C,D,answer[,explanation]`, files named `<subject>_val.csv`, `_dev.csv`, `_test.csv`.
- CMMLU: an unnamed index column, then `Question,A,B,C,D,Answer`; files `<subject>.csv`, usually in `dev/` and
  `test/` folders.

Each item gets `exam_type` = the benchmark ("C-Eval" or "CMMLU"), so `medtune eval` reports its accuracy as the
mean over subjects, as both benchmarks report theirs, and `exam_class` = `exam_subject` = the subject from the file
name (`clinical_medicine`), so every subject has its own row. Ids are `<subject>_<split>-<row id>` (the split
from the file-name suffix for C-Eval, from the folder for CMMLU), unique across everything converted at once.
Column names match whatever their case or surrounding spaces; every item goes through the same validation as
CMB-Exam files, and any problem is `file:line: field: message` with nothing written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from medtune.data.outputs import check_output_file
from medtune.data.readers import data_files, raise_if_problems, read_whole_text
from medtune.data.records import SINGLE_CHOICE, RecordProblem, to_exam_item
from medtune.errors import DataError, Problem

OPTION_COLUMNS = ("A", "B", "C", "D")
SPLITS = ("val", "dev", "test")


@dataclass(frozen=True)
class Layout:
    benchmark: str  # the exam_type of every converted item
    id_columns: tuple[str, ...]  # the row-id column's possible names (lower case); none: the row number counts
    header: str  # as the benchmark ships it, for messages


LAYOUTS = {
    "ceval": Layout("C-Eval", ("id",), "id,question,A,B,C,D,answer[,explanation]"),
    "cmmlu": Layout("CMMLU", ("", "unnamed: 0"), ",Question,A,B,C,D,Answer"),
}


def subject_and_split(path: Path, layout_name: str) -> tuple[str, str]:
    """`clinical_medicine_val.csv` -> (clinical_medicine, val); CMMLU `test/anatomy.csv` -> (anatomy, test)."""
    if layout_name == "ceval":
        subject, _, split = path.stem.rpartition("_")
        return (subject, split) if subject and split in SPLITS else (path.stem, "")
    return path.stem, path.parent.name if path.parent.name in SPLITS else ""


def csv_rows(path: Path, problems: list[Problem]) -> Iterator[tuple[int, list[str]]]:
    """(line the row starts on, fields) for every non-blank row, the header first; a quoted field may span lines.

    The file is decoded whole first (one subject's CSV is small), so a file that is not UTF-8 (GBK, as Excel saves
    Chinese CSV) is one problem at the line of its first bad byte, and no row of it is read."""
    text = read_whole_text(path, problems)
    if text is None:
        return
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                yield start, row
            start = reader.line_num + 1
    except csv.Error as exc:
        problems.append(Problem(str(path), start, None, f"not a readable CSV file ({exc})"))


def column_positions(header: list[str], layout: Layout, path: Path, line: int) -> dict[str, int]:
    """{role: column index} for id (when present), question, A-D, answer and explanation (when present)."""
    names = [cell.strip().lower() for cell in header]
    positions = {}
    for role in ("question", *OPTION_COLUMNS, "answer"):
        if role.lower() not in names:
            no_answers = role == "answer" and layout.benchmark == "C-Eval"
            hint = "; C-Eval test files hold no answers: convert the val or dev split" if no_answers else ""
            raise DataError([Problem(str(path), line, role, f"missing column (the header is {','.join(header)}; "
                                                            f"{layout.benchmark} files have {layout.header}){hint}")])
        positions[role] = names.index(role.lower())
    for role, candidates in (("id", layout.id_columns), ("explanation", ("explanation",))):
        found = [names.index(c) for c in candidates if c in names]
        if found:
            positions[role] = found[0]
    return positions


def exam_record(row: list[str], positions: dict[str, int], layout: Layout, subject: str, item_id: str) -> dict:
    """One CSV row as a CMB-Exam record (validated by the same converter as CMB files)."""
    answer = row[positions["answer"]].strip()
    if not answer:
        raise RecordProblem("answer", "empty: an item without its answer cannot be scored (a test split whose answers "
                                      "are not public cannot be converted; use val or dev)")
    record = {"id": item_id, "exam_type": layout.benchmark, "exam_class": subject, "exam_subject": subject,
              "question": row[positions["question"]].strip(),
              "option": {letter: row[positions[letter]].strip() for letter in OPTION_COLUMNS},
              "answer": answer.upper(), "question_type": SINGLE_CHOICE}
    if "explanation" in positions and row[positions["explanation"]].strip():
        record["explanation"] = row[positions["explanation"]].strip()
    try:
        to_exam_item(record)
    except RecordProblem as exc:
        column = exc.field.removeprefix("option.") if exc.field else exc.field  # name the CSV column
        raise RecordProblem(column, exc.message) from None
    return record


def convert_file(path: Path, layout_name: str, problems: list[Problem]) -> list[tuple[int, dict]]:
    """(line, CMB-Exam record) for every row of one CSV file; problems are collected, not raised."""
    layout = LAYOUTS[layout_name]
    subject, split = subject_and_split(path, layout_name)
    before = len(problems)
    rows = csv_rows(path, problems)
    header_line, header = next(rows, (None, None))
    if header is None:
        if len(problems) == before:  # not after a decoding problem: that file was never read
            problems.append(Problem(str(path), None, None, "no rows: the file is empty"))
        return []
    try:
        positions = column_positions(header, layout, path, header_line)
    except DataError as exc:
        problems += exc.problems
        return []
    converted = []
    for number, (line, row) in enumerate(rows):
        if len(row) != len(header):
            problems.append(Problem(str(path), line, None, f"{len(row)} fields where the header has {len(header)} "
                                                           "(an unquoted comma or line break inside a field?)"))
            continue
        row_id = row[positions["id"]].strip() if "id" in positions else str(number)
        item_id = f"{subject}_{split}-{row_id}" if split else f"{subject}-{row_id}"
        try:
            converted.append((line, exam_record(row, positions, layout, subject, item_id)))
        except RecordProblem as exc:
            problems.append(Problem(str(path), line, exc.field, exc.message))
    if not converted and not problems:
        problems.append(Problem(str(path), header_line, None, "no rows under the header"))
    return converted


def repeated_id_problems(converted: list[tuple[Path, int, dict]]) -> list[Problem]:
    first: dict[str, str] = {}
    problems = []
    for path, line, record in converted:
        where = f"{path}:{line}"
        if record["id"] in first:
            problems.append(Problem(str(path), line, "id", f"{record['id']!r} repeats {first[record['id']]} (the "
                                                           "same file given twice?)"))
        first.setdefault(record["id"], where)
    return problems


def convert_files(inputs: list[str], layout_name: str) -> list[dict]:
    """Every item of every CSV under `inputs` (files or folders), in file order; DataError lists every problem."""
    problems: list[Problem] = []
    converted = []
    for path in data_files(inputs, (".csv",)):
        converted += [(path, line, record) for line, record in convert_file(path, layout_name, problems)]
    problems += repeated_id_problems(converted)
    raise_if_problems(problems)
    return [record for _, _, record in converted]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune data convert",
        description="Convert C-Eval or CMMLU CSV files (one per subject) into one CMB-Exam JSON file that "
                    "`medtune eval cmb-exam --data_dir FILE.json` scores: exam_type is the benchmark, exam_class "
                    "the subject from the file name, ids <subject>_<split>-<row id>.",
    )
    parser.add_argument("--from", dest="layout", choices=sorted(LAYOUTS), required=True,
                        help="ceval: id,question,A,B,C,D,answer[,explanation], files <subject>_val|dev|test.csv; "
                             "cmmlu: unnamed index column, Question,A,B,C,D,Answer, files <subject>.csv.")
    parser.add_argument("inputs", nargs="+", metavar="IN", help="CSV files or folders (searched recursively).")
    parser.add_argument("--output", required=True, help="The CMB-Exam JSON file to write.")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    output = check_output_file(args.output, "--output")  # before any work
    records = convert_files(args.inputs, args.layout)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    subjects = Counter(record["exam_class"] for record in records)
    print(f"{output}: {len(records)} items from {len(subjects)} subjects "
          f"({', '.join(f'{name} {count}' for name, count in sorted(subjects.items()))})")
    return 0

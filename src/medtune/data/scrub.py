"""`medtune data scrub IN... --output_dir OUT`: replace personal information in data files of every format.

Streams: each file is read one line (one record) at a time and written as it is read, so memory stays constant
on large corpora (a `.json` file holding one array is the exception: JSON arrays are parsed whole). Each record
keeps its structure — the same keys, roles and turns — and every text field in it is scrubbed, ids and integers
included (an integer holding a phone number becomes its placeholder text); only the role fields are left as they
are. A record that cannot be read is listed as `file:line: field: message`, and then the
command stops with exit code 2 and writes nothing: a de-identification that passed a bad record through unread
could leak exactly what it was meant to remove.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.data.loading import FileReport, empty_file_problem, iter_file_records
from medtune.data.outputs import check_output_dir, mirrored, remove_quietly
from medtune.data.pii import KINDS, Replacer
from medtune.data.pii.names import load_name_dictionary
from medtune.data.readers import JSON_SUFFIXES, TEXT_SUFFIXES, data_files, decode_lines, is_json_array
from medtune.errors import DataError, Problem

logger = logging.getLogger(__name__)
SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES
# Roles are structure, never personal information. Everything else is read: ids too (an id such as
# "张伟-13812345678" leaks like any text), and integers (a phone number stored as a JSON number, 13812345678).
UNTOUCHED_KEYS = {"from", "role"}
REPORT_NAME = "scrub_report.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune data scrub",
        description="Replace personal information (names, phone numbers, resident ID numbers, medical record "
                    "numbers, e-mail addresses, street addresses, dates of birth, bank card numbers, ages over 89) "
                    "with typed placeholders such as [姓名1] and [电话1], numbered consistently within each "
                    "record, in pretraining text (.txt/.jsonl), conversations and preference pairs; ids and "
                    "integers are read too. Writes the scrubbed files under --output_dir with the same relative "
                    f"paths (several inputs: below the folder holding them all), and {REPORT_NAME} with "
                    "counts per kind and per file (never the values). Exit code 2 and nothing written if any "
                    "record cannot be read.",
    )
    parser.add_argument("paths", nargs="+", help="Files or folders (searched recursively for .txt/.json/.jsonl).")
    parser.add_argument("--output_dir", required=True, help="Folder for the scrubbed files and the report, outside "
                                                             "every input.")
    return parser


def output_paths(locations: list[str], output_dir: Path) -> list[tuple[Path, Path]]:
    """(input, output) pairs, mirrored under `output_dir` as `data contamination --write_clean` does; the output
    folder must be outside every input (a second run would otherwise read its own output)."""
    check_output_dir(output_dir, "--output_dir", locations)
    return mirrored(data_files(locations, SUFFIXES), locations, output_dir)


def scrub_value(value: Any, texts: list[str], put_back: Iterator[str] | None = None) -> Any:
    """Walk a JSON record: collect its text fields and integers into `texts`, or (with `put_back`) replace them in
    order. An integer that held personal information becomes the placeholder text; any other stays a number."""
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        text = str(value)
        if put_back is None:
            texts.append(text)
            return value
        scrubbed = next(put_back)
        return value if scrubbed == text else scrubbed
    if isinstance(value, list):
        return [scrub_value(item, texts, put_back) for item in value]
    if isinstance(value, dict):
        return {key: item if key in UNTOUCHED_KEYS else scrub_value(item, texts, put_back)
                for key, item in value.items()}
    return value


def scrub_record(record: Any, replacer: Replacer) -> Any:
    texts: list[str] = []
    scrub_value(record, texts)
    return scrub_value(record, [], iter(replacer.scrub_fields(texts)))


def scrub_text_file(source: Path, out, replacer: Replacer, problems: list[Problem]) -> int:
    """One document per line; blank lines are kept so the file keeps its shape."""
    records = 0
    for _, line in decode_lines(source, problems):
        body = line.rstrip("\r\n")
        if body.strip():
            body = replacer.scrub_fields([body])[0]
            records += 1
        out.write(body + line[len(line.rstrip("\r\n")):])
    return records


def scrub_json_file(source: Path, out, replacer: Replacer, problems: list[Problem]) -> int:
    """Every record must convert (as training would read it) before it is scrubbed: an unreadable one could
    pass personal information through unread."""
    array = is_json_array(source)
    records = 0
    for entry in iter_file_records(source, FileReport(str(source), "unknown", problems=problems)):
        text = json.dumps(scrub_record(entry.raw, replacer), ensure_ascii=False)
        out.write(("[\n" if records == 0 else ",\n") + text if array else text + "\n")
        records += 1
    if array:
        out.write("\n]\n" if records else "[]\n")
    return records


def scrub_file(source: Path, target: Path, problems: list[Problem]) -> dict:
    """Scrub `source` into `target` (a `.partial` file until every input is known to be good)."""
    replacer = Replacer()
    before = len(problems)
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(partial(target), "w", encoding="utf-8") as out:
        scrub = scrub_text_file if source.suffix.lower() in TEXT_SUFFIXES else scrub_json_file
        records = scrub(source, out, replacer, problems)
    if records == 0 and len(problems) == before and scrub is scrub_text_file:
        problems.append(empty_file_problem(source))
    return {"records": records, "replaced": {kind: replacer.counts[kind] for kind in KINDS}}


def partial(target: Path) -> Path:
    return target.with_name(target.name + ".partial")


def scrub_paths(locations: list[str], output_dir: str | Path, report_path: str | Path | None = None) -> dict:
    """Scrub every data file under `locations` into `output_dir`; returns the report, also written as JSON to
    `report_path` (default: `output_dir`/scrub_report.json; the pipeline keeps it out of the folder it trains on)."""
    output_dir = Path(output_dir)
    pairs = output_paths(locations, output_dir)
    problems: list[Problem] = []
    files = {}
    try:
        for source, target in pairs:
            files[str(source)] = scrub_file(source, target, problems)
    finally:
        if problems or len(files) < len(pairs):  # bad input or an interruption: leave nothing half-scrubbed
            for _, target in pairs:
                remove_quietly(partial(target))
    if problems:
        raise DataError(problems)
    for _, target in pairs:
        partial(target).replace(target)
    total = Counter()
    for summary in files.values():
        total.update(summary["replaced"])
    report = {"files": files, "records": sum(s["records"] for s in files.values()),
              "replaced": {kind: total[kind] for kind in KINDS}}
    Path(report_path or output_dir / REPORT_NAME).write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report


def format_table(report: dict) -> str:
    """Counts per file and kind, one row per file and a total row."""
    header = ["file", "records", *KINDS]
    rows = [[path, str(s["records"]), *(str(s["replaced"][k]) for k in KINDS)] for path, s in report["files"].items()]
    rows.append(["total", str(report["records"]), *(str(report["replaced"][k]) for k in KINDS)])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))) for row in [header, *rows])


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    load_name_dictionary()  # once per process (about a second), so the rate below is the scrubbing itself
    loaded = time.perf_counter()
    report = scrub_paths(args.paths, args.output_dir)
    seconds = time.perf_counter() - loaded
    print(format_table(report))
    print(f"{report['records']} records scrubbed in {seconds:.1f}s ({report['records'] / max(seconds, 1e-9):.0f} "
          f"records/s, after {loaded - started:.1f}s loading jieba's dictionary); report: "
          f"{Path(args.output_dir) / REPORT_NAME}")
    return 0

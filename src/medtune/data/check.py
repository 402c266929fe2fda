"""`medtune data check PATH...`: validate files of any supported format and describe them.

Prints, per file, the detected format, record count, token-length percentiles, and every problem as
`file:line: field: message`. Exits 2 when there is any problem, so it can guard a training script.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medtune.data.loading import KIND_SUFFIXES, read_file
from medtune.data.readers import list_data_files
from medtune.data.records import FORMAT_KEYS, ClinCase, Conversation, ExamItem, PreferencePair, TextDocument
from medtune.errors import DataError

logger = logging.getLogger(__name__)
ALL_SUFFIXES = tuple(sorted({s for suffixes in KIND_SUFFIXES.values() for s in suffixes}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune data check",
        description="Validate data files (pretraining text, SFT conversations, preference pairs) and print counts, "
                    "token-length percentiles and every problem. Exit code 2 if any record is malformed.",
    )
    parser.add_argument("paths", nargs="+", help="Files or folders (searched recursively for .txt/.json/.jsonl).")
    parser.add_argument("--data_format", choices=sorted(FORMAT_KEYS), default=None,
                        help="Force a format instead of detecting it from each file's records.")
    parser.add_argument("--tokenizer_name_or_path", default=None,
                        help="Tokenizer for the length statistics (default: the embedded tiny GLM-4 tokenizer).")
    parser.add_argument("--no_tokens", action="store_true", help="Skip token-length statistics (no model needed).")
    return parser


def render_for_length(record, tokenizer) -> list[str]:
    """The text(s) a record becomes in training, rendered through the tokenizer's chat template."""
    if isinstance(record, TextDocument):
        return [record.text]
    if isinstance(record, Conversation):
        return [tokenizer.apply_chat_template(record.messages, tokenize=False)]
    if isinstance(record, ExamItem):
        return [record.question + "\n" + "\n".join(f"{k}. {v}" for k, v in record.options.items())]
    if isinstance(record, ClinCase):
        return [record.description + "".join(p["question"] + p["solution"] for p in record.qa_pairs)]
    if not isinstance(record, PreferencePair):
        return []
    return [tokenizer.apply_chat_template(record.prompt + [{"role": "assistant", "content": answer}], tokenize=False)
            for answer in (record.chosen, record.rejected)]


def percentiles(values: list[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return f"p50={at(0.5)} p90={at(0.9)} p99={at(0.99)} max={ordered[-1]}"


def check_paths(paths: list[str], data_format: str | None = None, tokenizer=None) -> tuple[list, list]:
    """(file reports, problems) for every data file under `paths`; prints a line per file."""
    reports, problems = [], []
    files: list[Path] = []
    for location in paths:
        try:
            files += list_data_files(location, ALL_SUFFIXES)
        except DataError as exc:
            problems += exc.problems
    for path in files:
        records, report = read_file(path, None, data_format)
        reports.append(report)
        problems += report.problems
        lengths = []
        if tokenizer is not None:
            for record in records:
                lengths += [len(tokenizer(text, add_special_tokens=False)["input_ids"])
                            for text in render_for_length(record, tokenizer)]
        status = f"{len(report.problems)} problem(s)" if report.problems else "ok"
        tokens = f"  tokens {percentiles(lengths)}" if tokenizer is not None else ""
        print(f"{path}: {report.format}, {report.records} records{tokens}  [{status}]")
    return reports, problems


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    tokenizer = None
    if not args.no_tokens:
        from medtune.models.loader import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(args.tokenizer_name_or_path or resolve_model_path(None))
    reports, problems = check_paths(args.paths, args.data_format, tokenizer)
    total = sum(r.records for r in reports)
    print(f"{len(reports)} files, {total} valid records, {len(problems)} problems")
    if problems:
        raise DataError(problems, limit=len(problems))
    return 0

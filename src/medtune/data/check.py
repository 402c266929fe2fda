"""`medtune data check PATH...`: validate files of any supported format and describe them.

Prints, per file, the detected format, record count, token-length percentiles (measured with the same
`ChatTemplate` and tokenization as training), a count of duplicated records, and every problem as
`file:line: field: message`. Exits 2 when there is any problem -- an empty file or a folder with no valid record
included -- so it can guard a training script. Duplicates are reported as a warning (exit 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from medtune.data.blocks import tokenize_texts
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
                    "token-length percentiles (encoded as training encodes them), duplicated records and every "
                    "problem. Exit code 2 if any record is malformed or a file holds no record; duplicates are a "
                    "warning.",
    )
    parser.add_argument("paths", nargs="+", help="Files or folders (searched recursively for .txt/.json/.jsonl).")
    parser.add_argument("--data_format", choices=sorted(FORMAT_KEYS), default=None,
                        help="Force a format instead of detecting it from each file's records.")
    parser.add_argument("--tokenizer_name_or_path", default=None,
                        help="Tokenizer for the length statistics (default: the embedded tiny GLM-4 tokenizer).")
    parser.add_argument("--template", default=None,
                        help="Chat template to measure conversations with, as `--template` in training (glm4, "
                             "chatglm3, qwen, llama3, vicuna, alpaca). Default: the tokenizer's own.")
    parser.add_argument("--no_tokens", action="store_true", help="Skip token-length statistics (no model needed).")
    return parser


def token_lengths(record, template) -> list[int]:
    """Token counts of what a record becomes in training, encoded exactly as the stage encodes it: documents as
    `medtune pt` tokenizes them (EOS included), conversations and pairs through the same `ChatTemplate`."""
    tokenizer = template.tokenizer
    if isinstance(record, TextDocument):
        return [len(ids) for ids in tokenize_texts([record.text], tokenizer)]
    if isinstance(record, Conversation):
        return [len(template.encode(record.messages).input_ids)]
    if isinstance(record, PreferencePair):
        lengths = []
        for answer in (record.chosen, record.rejected):
            prompt, reply = template.encode_reply(record.prompt, answer)
            lengths.append(len(prompt) + len(reply))
        return lengths
    if isinstance(record, ExamItem):  # evaluation items: the plain text, a guide to prompt length
        text = record.question + "\n" + "\n".join(f"{k}. {v}" for k, v in record.options.items())
    elif isinstance(record, ClinCase):
        text = record.description + "".join(p["question"] + p["solution"] for p in record.qa_pairs)
    else:
        return []
    return [len(tokenizer(text, add_special_tokens=False)["input_ids"])]


def duplicate_key(record) -> str:
    """Two records are duplicates when everything but their file:line is equal."""
    content = {k: v for k, v in dataclasses.asdict(record).items() if k != "source"}
    return json.dumps(content, ensure_ascii=False, sort_keys=True)


def find_duplicates(records: list) -> list[tuple[str, str]]:
    """(repeat, first occurrence) file:line pairs, for every record equal to an earlier one (across files too)."""
    first: dict[str, str] = {}
    repeats = []
    for record in records:
        key = duplicate_key(record)
        if key in first:
            repeats.append((record.source, first[key]))
        else:
            first[key] = record.source
    return repeats


def percentiles(values: list[int]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)

    def at(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return f"p50={at(0.5)} p90={at(0.9)} p99={at(0.99)} max={ordered[-1]}"


def check_paths(paths: list[str], data_format: str | None = None, template=None) -> tuple[list, list, list]:
    """(file reports, problems, valid records) for every data file under `paths`; prints a line per file."""
    reports, problems, records = [], [], []
    files: list[Path] = []
    for location in paths:
        try:
            files += list_data_files(location, ALL_SUFFIXES)
        except DataError as exc:
            problems += exc.problems
    for path in files:
        file_records, report = read_file(path, None, data_format)
        reports.append(report)
        problems += report.problems
        records += file_records
        lengths = [n for record in file_records for n in token_lengths(record, template)] if template else []
        status = f"{len(report.problems)} problem(s)" if report.problems else "ok"
        tokens = f"  tokens {percentiles(lengths)}" if template is not None else ""
        print(f"{path}: {report.format}, {report.records} records{tokens}  [{status}]")
    return reports, problems, records


def report_duplicates(records: list, shown: int = 5) -> int:
    """Print how many records repeat an earlier one, with a few file:line pairs. Duplicates are a warning, not a
    failure: repeating good examples on purpose (upsampling) is legitimate, but it should never go unnoticed."""
    repeats = find_duplicates(records)
    if repeats:
        pairs = ", ".join(f"{repeat} = {first}" for repeat, first in repeats[:shown])
        more = f", ... ({len(repeats) - shown} more)" if len(repeats) > shown else ""
        print(f"warning: {len(repeats)} duplicated records (each equal to an earlier one): {pairs}{more}")
    return len(repeats)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    template = None
    if not args.no_tokens:
        from medtune.models.loader import load_chat_template, load_tokenizer, resolve_model_path

        path = args.tokenizer_name_or_path or resolve_model_path(None)
        template = load_chat_template(path, load_tokenizer(path), args.template)
    reports, problems, records = check_paths(args.paths, args.data_format, template)
    duplicates = report_duplicates(records)
    print(f"{len(reports)} files, {len(records)} valid records, {duplicates} duplicated, {len(problems)} problems")
    if problems:
        raise DataError(problems, limit=len(problems))
    return 0

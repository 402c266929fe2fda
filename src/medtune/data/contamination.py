"""`medtune data contamination`: find evaluation items that leaked into the training data, and drop them.

Every evaluation item (a CMB-Exam question with its options, a CMB-Clin case description with its questions) is
normalised and cut into overlapping character n-grams; their 64-bit hashes go into one dict (hash -> items) plus a
sorted array and a bitmap for the lookup, so memory grows with the evaluation side only. The training data is
streamed record by record (any format medtune trains on: every text field of a record counts) and looked up in
batches of 256 records. An item is contaminated by a record when
the share of the item's n-grams found in that record reaches `--threshold`.

Normalisation (both sides alike), so that re-typing an item does not hide it:
1. Unicode NFKC: full-width letters and digits become their half-width forms (`Ａ５` -> `A5`).
2. Stand-alone capital letters A-G are dropped: they are option labels (`A.`, `(B)`, `C、`, `D：`, `E 正后壁`), and
   an item re-typed with other labels, or none, must still match. Letters inside words (`aVF`, `HbA1c`) stay.
3. Everything that is not a letter or a digit is dropped (whitespace, all punctuation and symbols), then lower case.
"""

from __future__ import annotations

import json
import re
import shutil
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtune.data.loading import FileRecord, FileReport, iter_file_records
from medtune.data.outputs import check_output_dir, check_output_file, mirrored
from medtune.data.readers import (
    JSON_SUFFIXES,
    TEXT_SUFFIXES,
    data_files,
    is_json_array,
    raise_if_problems,
    read_json_records,
)
from medtune.data.records import (
    AnswerKey,
    ClinCase,
    Conversation,
    ExamItem,
    PreferencePair,
    TextDocument,
)
from medtune.errors import ConfigError, DataError, Problem

DATA_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES
NORMALISATION = ("NFKC; stand-alone capital letters A-G (option labels) dropped; only letters and digits kept; "
                 "lower case")
# Option labels (half- or full-width A-G with no letter or digit on either side, so the `A` of `HbA1c` stays) go
# before punctuation, while `A.` and `（Ａ）` still show where a label stands. The pattern starts with the letter (the
# look-behind comes after it) so the regex engine skips straight to candidate letters.
_ALNUM_ASCII = "A-Za-z0-9Ａ-Ｚａ-ｚ０-９"
_OPTION_LABEL = re.compile(rf"[A-GＡ-Ｇ](?<![{_ALNUM_ASCII}].)(?![{_ALNUM_ASCII}])")
_NOT_ALNUM = re.compile(r"[\W_]+")


@dataclass
class ContaminationArguments:
    """Options of `medtune data contamination` (also the `contamination` section of a pipeline config)."""

    train: list[str] = field(metadata={"help": "Training files or folders (.txt/.json/.jsonl, any format: "
                                               "pretraining text, conversations, preference pairs, exam items)."})
    eval: list[str] = field(metadata={"help": "Evaluation files or folders in the CMB schema (CMB-Exam items, "
                                              "CMB-Clin cases; answer-key files in a folder are skipped)."})
    ngram: int = field(default=13, metadata={"help": "Characters per n-gram, counted after normalisation."})
    threshold: float = field(
        default=0.3, metadata={"help": "An eval item counts as contaminated by a training record holding at least "
                                       "this share of the item's n-grams, in (0, 1]. Copies, verbatim or re-typed, "
                                       "score 1.0; each changed character hides up to `ngram` n-grams; unrelated "
                                       "text on the same topic scores below 0.17 on the bundled data."},
    )
    report: str = field(default="contamination_report.json", metadata={"help": "Where the JSON report is written."})
    write_clean: str | None = field(
        default=None, metadata={"help": "Write the training data without contaminated records to this new folder: "
                                        "same formats, same relative paths, untouched records byte for byte."},
    )

    def __post_init__(self):
        if self.ngram < 1:
            raise ConfigError(f"ngram must be at least 1, got {self.ngram}")
        if not 0.0 < self.threshold <= 1.0:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")


def normalise(text: str) -> str:
    # Punctuation goes first: most of what NFKC would rewrite in Chinese text is full-width punctuation, and text
    # left with nothing to rewrite passes NFKC's quick check instead of the (much slower) full normalisation.
    text = _NOT_ALNUM.sub("", _OPTION_LABEL.sub("", text))
    if not unicodedata.is_normalized("NFKC", text):
        text = _NOT_ALNUM.sub("", _OPTION_LABEL.sub("", unicodedata.normalize("NFKC", text)))
    return text.lower()


# n-grams are hashed as polynomials over their code points, mod 2**64 (numpy's uint64 arithmetic wraps): computed
# for a whole batch of records in a few array operations, about 8x faster than slicing and hashing each n-gram in
# Python (benchmarks/contamination_throughput.py measures both, and a rolling hash in Python).
_HASH_BASE = np.uint64(1_000_003)


def window_hashes(text: str, n: int) -> np.ndarray:
    """The hash of every n-character window of `text` (already normalised), in order."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    windows = len(codes) - n + 1
    if windows <= 0:
        return np.zeros(0, dtype=np.uint64)
    hashes = codes[:windows].copy()
    for k in range(1, n):
        hashes *= _HASH_BASE
        hashes += codes[k:k + windows]
    return hashes


# -- what text each record holds --------------------------------------------------------------------------------

def exam_item_text(item: ExamItem) -> str:
    return item.question + "\n" + "\n".join(f"{letter}. {text}" for letter, text in item.options.items())


def eval_item_text(item: ExamItem | ClinCase) -> str:
    """What a model is asked: question and options; a clinical case's description and its questions."""
    if isinstance(item, ExamItem):
        return exam_item_text(item)
    return item.description + "\n" + "\n".join(pair["question"] for pair in item.qa_pairs)


def training_text(record) -> str:
    """Every text field of a training record, one per line, in reading order."""
    if isinstance(record, TextDocument):
        return record.text
    if isinstance(record, Conversation):
        return "\n".join(m["content"] for m in record.messages)
    if isinstance(record, PreferencePair):
        return "\n".join([m["content"] for m in record.prompt] + [record.chosen, record.rejected])
    if isinstance(record, ExamItem):
        return exam_item_text(record) + "\n" + record.explanation
    if isinstance(record, ClinCase):
        pairs = [text for pair in record.qa_pairs for text in (pair["question"], pair["solution"])]
        return "\n".join([record.title, record.description, *pairs])
    raise TypeError(f"no text for {type(record).__name__}")


# -- streaming records of any format -------------------------------------------------------------------------------

def iter_records(path: Path, problems: list[Problem]) -> Iterator[FileRecord]:
    """The converted records of one file, streamed (see `medtune.data.loading.iter_file_records`)."""
    report = FileReport(str(path), "unknown", problems=problems)
    yield from iter_file_records(path, report)


# -- the evaluation side ---------------------------------------------------------------------------------------------

@dataclass
class EvalEntry:
    file: str
    id: str
    source: str
    ngrams: int  # distinct n-grams of the normalised item: the denominator of its overlap fraction


class EvalIndex:
    """Every evaluation item's n-gram hashes, each mapped to the item(s) holding it."""

    def __init__(self, n: int):
        self.n = n
        self.items: list[EvalEntry] = []
        self.too_short: list[EvalEntry] = []
        # hash -> index of the one item holding it, or a tuple of indices when several items share it
        self.owners: dict[int, int | tuple[int, ...]] = {}
        self._lookup: tuple[np.ndarray, np.ndarray, np.uint64] | None = None

    def add(self, file: str, item_id: str, source: str, text: str) -> None:
        hashes = set(window_hashes(normalise(text), self.n).tolist())
        entry = EvalEntry(file, item_id, source, len(hashes))
        if not hashes:
            self.too_short.append(entry)
            return
        self.items.append(entry)
        self.own(len(self.items) - 1, hashes)

    def own(self, index: int, hashes: Iterable[int]) -> None:
        for h in hashes:
            owner = self.owners.get(h)
            if owner is None:
                self.owners[h] = index
            else:
                self.owners[h] = (*owner, index) if isinstance(owner, tuple) else (owner, index)
        self._lookup = None

    def lookup(self) -> tuple[np.ndarray, np.ndarray, np.uint64]:
        """(every hash, sorted; a bitmap of their low bits; its mask): the bitmap turns away almost every training
        window with one array read, and only the few it lets through are searched in the sorted array."""
        if self._lookup is None:
            known = np.array(sorted(self.owners), dtype=np.uint64)
            size = 1 << max(20, min(30, (16 * len(known)).bit_length()))
            mask = np.uint64(size - 1)
            bitmap = np.zeros(size, dtype=bool)
            bitmap[known & mask] = True
            self._lookup = known, bitmap, mask
        return self._lookup

    def shares(self, hashes: Iterable[int]) -> dict[int, float]:
        """{item index: share of that item's n-grams among `hashes`} for every item holding one of them."""
        shared: dict[int, int] = {}
        for h in set(hashes):
            owner = self.owners.get(h)
            for index in (() if owner is None else owner if isinstance(owner, tuple) else (owner,)):
                shared[index] = shared.get(index, 0) + 1
        return {index: count / self.items[index].ngrams for index, count in shared.items()}

    def batch_overlaps(self, texts: list[str]) -> list[dict[int, float]]:
        """For each normalised text, {item index: overlap} of every item it shares an n-gram with (mostly {})."""
        n, known, (sorted_hashes, bitmap, mask) = self.n, {}, self.lookup()
        ends = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))
        hashes = window_hashes("".join(texts), n)  # windows across two records are ignored below
        candidates = np.flatnonzero(bitmap[hashes & mask])
        if len(candidates):
            found = np.minimum(np.searchsorted(sorted_hashes, hashes[candidates]), len(sorted_hashes) - 1)
            hits = candidates[sorted_hashes[found] == hashes[candidates]]
            records = np.searchsorted(ends, hits, side="right")
            for record in np.unique(records[hits + n <= ends[records]]).tolist():
                start = ends[record] - len(texts[record])
                known[record] = self.shares(hashes[start:ends[record] - n + 1].tolist())
        return [known.get(record, {}) for record in range(len(texts))]

    def overlaps(self, text: str) -> dict[int, float]:
        """{item index: share of that item's n-grams present in `text`} for every item sharing an n-gram."""
        return self.batch_overlaps([normalise(text)])[0]


def build_eval_index(locations: list[str], n: int) -> tuple[EvalIndex, list[str]]:
    """(the index, notes on skipped answer-key files). Raises DataError on any malformed evaluation record."""
    index, problems, notes = EvalIndex(n), [], []
    for path in data_files(locations, DATA_SUFFIXES):
        records = [(entry.line, entry.record) for entry in iter_records(path, problems)]
        if records and all(isinstance(r, AnswerKey) for _, r in records):
            notes.append(f"{path}: answer key, holds no item text (skipped)")
            continue
        for line, record in records:
            if not isinstance(record, (ExamItem, ClinCase)):
                problems.append(Problem(str(path), line, None, f"{type(record).__name__} is not an evaluation item "
                                                               "(expected CMB-Exam items or CMB-Clin cases)"))
                break
            index.add(str(path), record.id, record.source, eval_item_text(record))
    raise_if_problems(problems)
    if not index.items:
        raise DataError([Problem(", ".join(locations), None, None, "no evaluation items to check (CMB-Exam "
                                                                   f"items or CMB-Clin cases of at least {n} "
                                                                   "characters after normalisation)")])
    return index, notes


# -- the training side -----------------------------------------------------------------------------------------------

@dataclass
class Match:
    item: int
    train_file: str
    line: int
    index: int  # the record's position in its file: a .json array written on one line has every record on line 1
    overlap: float


@dataclass
class Scan:
    files: list[Path] = field(default_factory=list)
    records: int = 0
    matches: list[Match] = field(default_factory=list)
    arrays: set[str] = field(default_factory=set)  # files that are one .json array: records told apart by position


def scan_training(index: EvalIndex, locations: list[str], threshold: float, batch_size: int = 256) -> Scan:
    """Stream every training record against the index; matches at or above `threshold` (DataError on bad input).

    Records are looked up `batch_size` at a time (array operations amortised over the batch, memory still bounded
    by one batch)."""
    scan, problems, batch = Scan(files=data_files(locations, DATA_SUFFIXES)), [], []

    def look_up() -> None:
        for (path, line, position, _), overlaps in zip(batch, index.batch_overlaps([b[3] for b in batch])):
            scan.matches += [Match(item, path, line, position, overlap) for item, overlap in overlaps.items()
                             if overlap >= threshold]
        batch.clear()

    for path in scan.files:
        if is_json_array(path):
            scan.arrays.add(str(path))
        for entry in iter_records(path, problems):
            if isinstance(entry.record, AnswerKey):
                problems.append(Problem(str(path), entry.line, None, "an answer key is not training data"))
                break
            scan.records += 1
            batch.append((str(path), entry.line, entry.index, normalise(training_text(entry.record))))
            if len(batch) == batch_size:
                look_up()
    look_up()
    raise_if_problems(problems)
    return scan


# -- writing the clean copy ---------------------------------------------------------------------------------------

def write_without(source: Path, target: Path, removed: set[tuple[int, int]]) -> None:
    """Copy `source` without the `removed` records, (line, index) each; kept records are copied unchanged. A .json
    array is written again without the removed elements (by index: a one-line array has them all on line 1), a
    line-per-record file without the removed lines."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not removed:
        shutil.copyfile(source, target)
        return
    if is_json_array(source):
        indices = {index for _, index in removed}
        kept = [record for index, (_, record) in enumerate(read_json_records(source, [])) if index not in indices]
        target.write_text(json.dumps(kept, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return
    lines = {line for line, _ in removed}
    with open(source, "rb") as reader, open(target, "wb") as writer:
        writer.writelines(raw for number, raw in enumerate(reader, start=1) if number not in lines)


def write_clean(scan: Scan, locations: list[str], target: Path) -> dict[str, int]:
    """{file: records removed} for every training file, written under `target`."""
    removed: dict[str, set[tuple[int, int]]] = {str(p): set() for p in scan.files}
    for match in scan.matches:
        removed[match.train_file].add((match.line, match.index))
    for path, clean in mirrored(scan.files, locations, target):
        write_without(path, clean, removed[str(path)])
    return {name: len(records) for name, records in removed.items()}


# -- report ---------------------------------------------------------------------------------------------------------

def build_report(args: ContaminationArguments, index: EvalIndex, scan: Scan, removed: dict[str, int] | None) -> dict:
    by_item: dict[int, list[Match]] = {}
    for match in scan.matches:
        by_item.setdefault(match.item, []).append(match)
    contaminated = []
    for item in sorted(by_item):
        entry = index.items[item]
        matches = sorted(by_item[item], key=lambda m: -m.overlap)
        contaminated.append({"eval_file": entry.file, "id": entry.id, "eval_source": entry.source,
                             "ngrams": entry.ngrams,
                             "matches": [{"train": f"{m.train_file}:{m.line}", "record": m.index,
                                          "overlap": round(m.overlap, 4)} for m in matches]})
    report = {
        "ngram": args.ngram, "threshold": args.threshold, "normalisation": NORMALISATION,
        "eval_items": len(index.items) + len(index.too_short), "eval_items_checked": len(index.items),
        "eval_items_too_short": [f"{e.file}:{e.id}" for e in index.too_short],
        "train_files": len(scan.files), "train_records": scan.records,
        "contaminated_items": len(contaminated),
        "contaminated_records": len({(m.train_file, m.index) for m in scan.matches}),
        "contaminated": contaminated,
    }
    if removed is not None:
        report["clean"] = {"output_dir": args.write_clean, "records_removed": sum(removed.values()),
                           "records_kept": scan.records - sum(removed.values()),
                           "removed_per_file": {name: count for name, count in removed.items() if count}}
    return report


def table_location(match: dict, arrays: set[str]) -> str:
    """`file:line` of a matching record, and for an element of a .json array also `[#N]`, its position in the
    array (counted from 0, the report's "record"): a one-line array has every element on line 1."""
    in_array = match["train"].rpartition(":")[0] in arrays
    return f"{match['train']}[#{match['record']}]" if in_array else match["train"]


def print_table(report: dict, arrays: set[str]) -> None:
    rows = [(item["id"], f"{match['overlap']:.3f}", table_location(match, arrays), item["eval_file"])
            for item in report["contaminated"] for match in item["matches"]]
    if rows:
        header = ("eval id", "overlap", "training record", "eval file")
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(3)]
        for row in [header, *rows]:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
    print(f"{report['contaminated_items']} of {report['eval_items_checked']} evaluation items contaminated "
          f"(overlap >= {report['threshold']} of their {report['ngram']}-grams) by {report['contaminated_records']} "
          f"of {report['train_records']} training records in {report['train_files']} files")
    if report["eval_items_too_short"]:
        print(f"{len(report['eval_items_too_short'])} evaluation items are shorter than one n-gram and were not "
              f"checked: {', '.join(report['eval_items_too_short'][:5])}")
    if "clean" in report:
        clean = report["clean"]
        print(f"wrote {clean['output_dir']}: {clean['records_kept']} records kept, {clean['records_removed']} removed")


def run_contamination(args: ContaminationArguments) -> dict:
    check_output_file(args.report, "--report")  # before any work: a bad path must not cost the run, nor follow
    if args.write_clean:                        # a clean copy already written
        check_output_dir(args.write_clean, "--write_clean", args.train, must_be_empty=True)
    index, notes = build_eval_index(args.eval, args.ngram)
    for note in notes:
        print(note)
    scan = scan_training(index, args.train, args.threshold)
    removed = write_clean(scan, args.train, Path(args.write_clean)) if args.write_clean else None
    report = build_report(args, index, scan, removed)
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print_table(report, scan.arrays)
    print(f"report: {args.report}")
    return report


DESCRIPTION = ("Find evaluation items (CMB-Exam questions with options, CMB-Clin cases) present in training data: "
               "character n-gram overlap after normalising width, punctuation, whitespace and option labels. Prints "
               "each contaminated item with the training file:line and the share of its n-grams found there, "
               "writes a JSON report, and with --write_clean a copy of the training data without those records.")


def main(argv: list[str]) -> int:
    from medtune.config import parse_arguments

    (args,) = parse_arguments((ContaminationArguments,), argv, prog="medtune data contamination",
                              description=DESCRIPTION)
    run_contamination(args)
    return 0

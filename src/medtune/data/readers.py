"""Low-level readers: files -> (line number, raw record), reporting encoding and JSON problems as `Problem`s.

Readers never raise on a bad record; they collect problems so one run can report all of them, and the caller
raises `DataError` before any training starts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.errors import DataError, Problem

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")


def list_data_files(location: str | Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files with one of `suffixes` under `location` (a file or a folder, searched recursively), sorted."""
    path = Path(location).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        raise DataError([Problem(str(path), None, None, "no such file or folder")])
    matched = [p for p in files if p.suffix.lower() in suffixes]
    if not matched:
        raise DataError([Problem(str(path), None, None, f"no {'/'.join(suffixes)} files found")])
    return matched


def data_files(locations: list[str] | tuple[str, ...], suffixes: tuple[str, ...]) -> list[Path]:
    """Every file with one of `suffixes` under `locations`, each once (a file named twice, itself and inside its
    folder, is read once); DataError lists every location that holds none."""
    files, problems = [], []
    for location in locations:
        try:
            files += list_data_files(location, suffixes)
        except DataError as exc:
            problems += exc.problems
    raise_if_problems(problems)
    return list(dict.fromkeys(files))


def is_json_array(path: Path) -> bool:
    """Whether `path` is a .json file holding one array (read up to its first character that is not a
    byte-order mark or whitespace)."""
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as handle:
        while chunk := handle.read(4096):
            head = chunk.lstrip(b"\xef\xbb\xbf \t\r\n")
            if head:
                return head[:1] == b"["
    return False


def utf8_problem(path: Path, raw: bytes, exc: UnicodeDecodeError, first_line: int = 1) -> Problem:
    """Where `raw` (starting at `first_line` of `path`) stops being UTF-8, as a file:line problem with the column."""
    line = first_line + raw.count(b"\n", 0, exc.start)
    column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
    return Problem(str(path), line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
                                          "re-save the file as UTF-8")


def decode_lines(path: Path, problems: list[Problem]) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) pairs; a line that is not UTF-8 becomes a problem, not a crash."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # tolerate a UTF-8 byte-order mark (Windows editors add one)
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(utf8_problem(path, raw, exc, number))


def read_text_lines(path: Path, problems: list[Problem]) -> Iterator[tuple[int, str]]:
    """Non-empty lines of a plain-text file; each line is one document."""
    for number, line in decode_lines(path, problems):
        text = line.strip()
        if text:
            yield number, text


def _array_element_lines(text: str) -> Iterator[int]:
    """The line each element starts on of `text`, a JSON array already known to be valid."""
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1, 0  # lines are counted incrementally: a large array stays linear
    while True:
        while text[pos] in " \t\r\n,":
            pos += 1
        if text[pos] == "]":
            return
        line += text.count("\n", counted, pos)
        counted = pos
        yield line
        pos = decoder.raw_decode(text, pos)[1]


def _json_error(path: Path, exc: json.JSONDecodeError) -> Problem:
    hint = ""
    if exc.msg == "Extra data":
        hint = " after the end of the array: a .json file holds one array (use .jsonl for one record per line)"
    return Problem(str(path), exc.lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno}){hint}")


def _read_json_array(path: Path, text: str, problems: list[Problem]) -> Iterator[tuple[int, Any]]:
    """Records of a file holding one JSON array, each with the line it starts on.

    The whole text goes through the JSON parser first, so anything after the closing bracket (a second array,
    JSON Lines, garbage) and a missing comma between records are errors, not a silently shorter array; only
    then is the (valid) array walked again to find the line where each record starts.
    """
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.append(_json_error(path, exc))
        return
    yield from zip(_array_element_lines(text), records)


def read_whole_text(path: Path, problems: list[Problem]) -> str | None:
    """The file's text, decoded whole (a UTF-8 byte-order mark is fine); None, with one problem at the line of the
    first bad byte, when it is not UTF-8."""
    raw = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(utf8_problem(path, raw, exc))
        return None


def read_json_records(path: Path, problems: list[Problem]) -> Iterator[tuple[int, Any]]:
    """Records of a JSON Lines file, or of a .json file holding one array of records (or JSON Lines)."""
    if is_json_array(path):
        text = read_whole_text(path, problems)
        if text is not None:
            yield from _read_json_array(path, text, problems)
        return
    for number, line in decode_lines(path, problems):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), number, None, f"invalid JSON: {exc.msg} (column {exc.colno})"))


def raise_if_problems(problems: list[Problem]) -> None:
    if problems:
        raise DataError(problems)

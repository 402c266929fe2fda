"""Resumable answer files, shared by `medtune eval` and `medtune predict`.

Answers are appended one JSON line per item as they are produced, with the settings they were made with recorded
beside them; a re-run reads back every complete line and answers only what is missing. What an answer depends on
includes the model's weights, fingerprinted here without reading them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

# Files of a model or adapter folder whose change can change an answer: weights (and their shard index), the
# architecture config, generation defaults, and the tokenizer with its chat template.
ANSWER_FILE_SUFFIXES = (".safetensors", ".bin", ".index.json")
ANSWER_FILE_NAMES = ("config.json", "generation_config.json", "adapter_config.json", "tokenizer.json",
                     "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja")


def folder_fingerprint(folder: str | None) -> str | None:
    """Size and mtime of every answer-changing file in a model/adapter folder, hashed (None: not a local folder).

    Stat only, no reading: a 9B model's weights are fingerprinted in microseconds, and a save at the same path
    always moves the mtime.
    """
    if not folder or not Path(folder).is_dir():
        return None
    entries = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and (path.name in ANSWER_FILE_NAMES or path.name.endswith(ANSWER_FILE_SUFFIXES)):
            stat = path.stat()
            entries.append(f"{path.name}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]


def read_settings(settings_file: Path) -> dict | None:
    """The settings a run recorded; None when the file is missing, cut short or not a settings object."""
    try:
        settings = json.loads(settings_file.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return settings if isinstance(settings, dict) else None


def changed_settings(previous: dict, settings: dict) -> list[str]:
    """The names of the settings that differ, sorted (one only in either counts as changed)."""
    return sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))


def read_predictions(path: Path) -> dict[str, dict]:
    """id -> record of every complete line; a line cut short by a kill (mid JSON or mid UTF-8 character) is
    dropped from the file, so its item is predicted again and the appended lines start on a line of their own."""
    if not path.is_file():
        return {}
    data = path.read_bytes()
    done: dict[str, dict] = {}
    kept: list[bytes] = []
    dropped = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        record = parse_prediction(raw)
        if record is None:
            dropped += 1
            continue
        done[str(record["id"])] = record
        kept.append(raw)
    if dropped or not data.endswith(b"\n"):
        write_atomically(path, b"".join(line + b"\n" for line in kept))
    if dropped:
        logger.warning("%s: %d unreadable line(s) dropped (cut short by a kill?); those items are predicted again",
                       path, dropped)
    return done


def parse_prediction(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "id" in record else None


def write_atomically(path: Path, data: bytes) -> None:
    """Write whole or not at all: a kill mid-write leaves the previous file (or none), never a cut one."""
    scratch = path.with_name(path.name + ".partial")
    scratch.write_bytes(data)
    os.replace(scratch, path)


def append_lines(path: Path, records: list[dict]) -> None:
    """Append one JSON line per record, flushed, so a kill after this call loses none of them."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
        handle.flush()


def progress(total: int, done: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=description, unit="item", dynamic_ncols=True)

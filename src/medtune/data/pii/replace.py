"""Replace what `find_pii` found with typed, indexed placeholders, consistently across one record's fields."""

from __future__ import annotations

import re
from collections import Counter

from medtune.data.pii.detect import PLACEHOLDERS, Span, ascii_digits, find_pii

NUMERIC_KINDS = {"phone", "id_card", "bank_card", "record_no", "age"}


def identity(kind: str, value: str) -> str:
    """What makes two mentions the same thing: digits for numbers (138-1234-5678 = 13812345678), a lower-case
    e-mail, the text itself otherwise."""
    if kind in NUMERIC_KINDS:
        digits = re.sub(r"[^0-9Xx]", "", ascii_digits(value)).upper()
        return digits[2:] if kind == "phone" and len(digits) == 13 and digits.startswith("86") else digits
    if kind == "email":
        return value.lower()
    return re.sub(r"\s", "", value)


def _free(span: Span, taken: list[Span]) -> bool:
    return all(span.end <= other.start or span.start >= other.end for other in taken)


def repeat_names(text: str, spans: list[Span], names: set[str]) -> list[Span]:
    """Spans plus every other mention of a name found elsewhere in the record (患者张伟… later: 张伟今日复诊)."""
    extra = []
    for name in names:
        for match in re.finditer(re.escape(name), text):
            span = Span(match.start(), match.end(), "name")
            if _free(span, spans + extra):
                extra.append(span)
    return sorted(spans + extra, key=lambda s: s.start)


def find_in_record(texts: list[str]) -> list[list[Span]]:
    """The findings in each field of one record; a full name found with a name boundary after it (患者张伟，男 /
    张伟医生) is found everywhere in the record. One found without (患者张伟头痛) is replaced where it was found
    only: were it a word after all, spreading it would wreck every other use of that word."""
    from medtune.data.pii.names import name_boundary

    found = [find_pii(text) for text in texts]
    names = {text[s.start:s.end] for text, spans in zip(texts, found) for s in spans
             if s.kind == "name" and s.end - s.start >= 2 and name_boundary(text, s.end)}
    if names:
        found = [repeat_names(text, spans, names) for text, spans in zip(texts, found)]
    return found


class Replacer:
    """Scrubs the text fields of one record at a time; `counts` accumulates what was replaced, by kind."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def scrub_fields(self, texts: list[str]) -> list[str]:
        """The fields of one record with every finding replaced; the same person (number, address …) gets the
        same placeholder in every field of the record, and numbering starts again with each record."""
        found = find_in_record(texts)
        numbering: dict[tuple[str, str], int] = {}
        per_kind: Counter[str] = Counter()

        def placeholder(kind: str, value: str) -> str:
            key = (kind, identity(kind, value))
            if key not in numbering:
                per_kind[kind] += 1
                numbering[key] = per_kind[kind]
            return f"[{PLACEHOLDERS[kind]}{numbering[key]}]"

        scrubbed = []
        for text, spans in zip(texts, found):
            pieces, position = [], 0
            for span in spans:
                pieces += [text[position:span.start], placeholder(span.kind, text[span.start:span.end])]
                position = span.end
                self.counts[span.kind] += 1
            scrubbed.append("".join(pieces) + text[position:])
        return scrubbed

"""Personal information in Chinese clinical text: where it is (`find_pii`) and how it is replaced (`Replacer`).

Numbers are found by pattern and proven by their own check (resident ID: ISO 7064 MOD 11-2 check digit and birth
date; bank cards: Luhn, both from python-stdnum); record numbers, dates of birth and cued addresses by the words
that introduce them; personal names by context cues confirmed against jieba's dictionary (see `names`).
"""

from medtune.data.pii.detect import KINDS, PLACEHOLDERS, Span, find_pii
from medtune.data.pii.replace import Replacer

__all__ = ["KINDS", "PLACEHOLDERS", "Replacer", "Span", "find_pii"]

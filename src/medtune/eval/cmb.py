"""CMB-Exam: prompts in the official formats, answer extraction, majority vote, and scoring.

Prompt stem (official): `以下是中国{exam_type}中{exam_class}考试的一道{question_type}，` followed by either
`不需要做任何分析和解释，直接输出答案选项。` (answer-only) or `请分析每个选项，并最后给出答案。` (chain of thought),
then the question and one `A. text` line per option.

Two modes. `official=True` reproduces the official CMB scripts exactly, quirks included, so numbers can be cited next
to the leaderboard: options in file order with one-character options dropped (`len(value) > 1`), few-shot examples
drawn at random from the same exam type and class with the reply `答案是{answer}。`, the official `match_choice` +
`extract_ans` extraction (first answer cue up to the first 。 or ., letters in reply order with duplicates, else
every capital A-G in the reply; first letter only for single choice) and exact-string scoring. The default mode is
the robust one: every option shown in letter order, deterministic few-shot examples, an extraction that looks for
the answer a reply commits to (and returns '' when there is none), and letter-set scoring that reports how many
answers were counted right only thanks to normalising them.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from medtune.data.readers import raise_if_problems, read_json_records
from medtune.data.records import OPTION_LETTERS, AnswerKey, ExamItem, normalise_letters
from medtune.errors import Problem

ANSWER_ONLY = "不需要做任何分析和解释，直接输出答案选项。"
CHAIN_OF_THOUGHT = "请分析每个选项，并最后给出答案。"


def shown_options(item: ExamItem, official: bool = False) -> dict[str, str]:
    """The options put in front of the model.

    Official: file order, and an option is kept iff `len(value) > 1` (no strip: "无" goes, "无 " stays).
    Default: every option, in letter order.
    """
    if official:
        return {letter: text for letter, text in item.options.items() if len(text) > 1}
    return dict(sorted(item.options.items()))


def item_prompt(item: ExamItem, cot: bool = False, official: bool = False) -> str:
    """The question as the model reads it. Under `official` a few-shot example loses its one-character options too:
    the official scripts build examples with the same `len(value) > 1` filter (`get_single_query`)."""
    options = shown_options(item, official)
    lines = [f"以下是中国{item.exam_type}中{item.exam_class}考试的一道{item.question_type}，"
             f"{CHAIN_OF_THOUGHT if cot else ANSWER_ONLY}", item.question]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines)


def shot_reply(item: ExamItem, cot: bool, official: bool = False) -> str:
    """The assistant turn of a few-shot example.

    Official: `答案是{answer}。`, or with CoT `{explanation}所以答案是{answer}。` (verbatim, nothing stripped).
    Default: the bare letters (what the answer-only instruction asks for), or the explanation ending in the answer.
    """
    if official:
        return f"{item.explanation}所以答案是{item.answer}。" if cot else f"答案是{item.answer}。"
    if cot and item.explanation:
        return f"{item.explanation.strip()}\n所以答案是{item.answer}。"
    return item.answer or ""


def item_messages(item: ExamItem, shots: list[ExamItem], cot: bool = False, official: bool = False) -> list[dict]:
    """The conversation sent to the model: few-shot examples as earlier turns, then the item."""
    messages: list[dict] = []
    for example in shots:
        messages += [{"role": "user", "content": item_prompt(example, cot, official)},
                     {"role": "assistant", "content": shot_reply(example, cot, official)}]
    messages.append({"role": "user", "content": item_prompt(item, cot, official)})
    return messages


def pick_shots(val_items: list[ExamItem], item: ExamItem, count: int, official: bool = False,
               seed: int = 42) -> list[ExamItem]:
    """The few-shot examples for `item` (never the item itself).

    Official: `random.sample` of `count` val items of the same exam_type and exam_class (fewer when fewer exist),
    from a generator seeded by `seed` and the item's id -- so an item gets the same examples whatever the batch or
    a resumed run processed before it. Default: the first `count` val items of the same exam_class, then of any
    class, in file order.
    """
    if count <= 0:
        return []
    if official:
        pool = [v for v in val_items
                if v.exam_type == item.exam_type and v.exam_class == item.exam_class and v.id != item.id]
        return random.Random(f"{seed}:{item.id}").sample(pool, min(count, len(pool)))
    same = [v for v in val_items if v.exam_class == item.exam_class and v.id != item.id]
    rest = [v for v in val_items if v.exam_class != item.exam_class and v.id != item.id]
    return (same + rest)[:count]


def short_of_shots(val_items: list[ExamItem], items: list[ExamItem], count: int) -> dict[tuple[str, str], int]:
    """(exam_type, exam_class) -> val items available, for each group of `items` with fewer than `count` examples
    under the official same-type-and-class rule (the official script stops there; we use what there is)."""
    available = Counter((v.exam_type, v.exam_class) for v in val_items)
    groups = {(i.exam_type, i.exam_class) for i in items}
    return {g: available[g] for g in sorted(groups) if available[g] < count}


# -- answer extraction ------------------------------------------------------------------------------------------

_OPEN, _CLOSE = r"[（(【\[*]*", r"[)）】\]*]*"
_ONE = rf"{_OPEN}[{OPTION_LETTERS}]{_CLOSE}"
_SEPARATOR = r"[ \t]*[、,，/和及与]?[ \t]*"
# A letter is an answer only where a word could not continue it: "C。", "C，", "C)", "ABCDE都对" -- not "B选项错误"
# at the start of a reply or "ACE抑制剂".
_END = r"(?=$|[\s。．.,，、:：;；!！?？]|\*|都|均|皆|全部|全对|全选)"
# After an explicit answer cue the letters may also be followed by 选项 / 项 ("答案是B选项"), but a letter joined on
# after a comma may not: "答案是A，B选项是干扰项" answers A.
_CUE_END = r"(?=$|[\s。．.,，、:：;；!！?？]|\*|都|均|皆|全部|全对|全选|选项|项)"


def _letters(end: str) -> str:
    """Letters joined by 、 , / 和 及 与 or spaces on one line ("A、C", "B和D", "A C"), never across a newline."""
    return rf"{_ONE}(?:{_SEPARATOR}{_ONE}(?={_CLOSE}{end}|{_SEPARATOR}{_OPEN}[A-G]))*"


# Between a cue and its letters; whitespace may include line breaks, so "答案：\nB" and "答案是：\n\nC. …" count.
_CONNECT = r"(?:\s*(?:应该是|应该为|应当是|应是|应为|是|为|：|:|选项|选))*\s*"
# Strong cues state the answer; a bare 选 / 选择 also appears in "不选A", so it counts only when nothing stronger does.
_STRONG_CUE = re.compile(rf"(?:正确答案|正确选项|参考答案|最佳答案|答案|故选|应选|(?i:answer is|answer:|answer)){_CONNECT}"
                         rf"({_letters(_END)}){_CUE_END}")
# "B选项正确。", "选项B正确", "A、C项正确" -- a verdict on options, not "B选项不正确", "A项对应…" or "维生素C正确…"
# (the word 选项 / 项 must name the letters as options).
_STATED_RIGHT = re.compile(rf"(?<![A-Za-z])(?:选项({_letters('(?=是|为|正确|对)')})|({_letters('(?=选项|项)')})(?:选项|项))"
                           r"(?:是|为)?(?:正确(?!与否)|对(?=的|$|[\s。．.,，、;；!！]))")
_WEAK_CUE = re.compile(rf"(?<!不)(?:选择|选){_CONNECT}({_letters(_END)}){_END}")
# A reply that starts with its letters: "A", "A、C", "BD", "C。", "(B)", "B. 多西环素"
_LEADING = re.compile(rf"^\s*({_letters(_END)}){_END}")
_FULL_WIDTH_LETTERS = str.maketrans("ＡＢＣＤＥＦＧ", OPTION_LETTERS)  # "答案：Ｂ" from a model writing full-width
# The official `match_choice` pattern: searched once, `.` matching newlines, lazy up to the first 。 or . or the end.
_OFFICIAL_CUE = re.compile(r"(答案|正确选项)(?:是|：|为|应该是|应该为)(.*?)(。|\.|$)", re.S)


def official_extraction(reply: str, multiple: bool) -> str:
    """The official `match_choice` + `extract_ans`: capital A-G in reply order, duplicates kept, nothing sorted;
    a single-choice item keeps only the first letter."""
    match = _OFFICIAL_CUE.search(reply)
    letters = "".join(c for c in (match.group(2) if match else reply) if c in OPTION_LETTERS)
    return letters[:1] if not multiple else letters


def extract_answer(reply: str, options: str = OPTION_LETTERS, official: bool = False, multiple: bool = False) -> str:
    """The option letters a reply commits to ('' when it commits to none); `multiple` marks a 多项选择题."""
    if official:
        return official_extraction(reply, multiple)
    reply = reply.translate(_FULL_WIDTH_LETTERS)
    # chain-of-thought replies state their answer last, so the last cue wins; verdicts on options add up
    stated_right = "".join(letters for match in _STATED_RIGHT.findall(reply) for letters in match)
    found = next((cues[-1] for cues in (_STRONG_CUE.findall(reply), [stated_right],
                                         _WEAK_CUE.findall(reply)) if cues and cues[-1]), None)
    if found is None:
        leading = _LEADING.match(reply)
        if not leading:
            return ""
        found = leading.group(1)
    letters = normalise_letters(found)
    return letters if letters and set(letters) <= set(options) else ""


def majority_vote(answers: list[str]) -> str:
    """The most frequent non-empty answer over sampled replies; the first seen wins a tie ('' when all are empty),
    as in the official self-consistency setting."""
    counts = Counter(a for a in answers if a)
    return max(counts, key=counts.__getitem__) if counts else ""


def answer_records(items: list[ExamItem], replies: list[str], num_samples: int, official: bool) -> list[dict]:
    """predictions.jsonl records for generated replies (`num_samples` consecutive replies per item): the extracted
    answer and the reply, or every sampled reply, its extraction and the majority vote."""
    records = []
    for index, item in enumerate(items):
        own = replies[index * num_samples:(index + 1) * num_samples]
        answers = [extract_answer(r, "".join(item.options), official, item.multiple) for r in own]
        if num_samples == 1:
            records.append({"id": item.id, "model_answer": answers[0], "reply": own[0]})
        else:
            records.append({"id": item.id, "model_answer": majority_vote(answers), "replies": own,
                            "sample_answers": answers})
    return records


# -- scoring -----------------------------------------------------------------------------------------------------

@dataclass
class Score:
    by_class: dict[tuple[str, str], float]  # (exam_type, exam_class) -> accuracy
    by_type: dict[str, float]  # exam_type -> mean of its classes
    overall: float  # mean of the exam types (the leaderboard's average)
    item_accuracy: float  # share of all items answered right
    counts: dict[tuple[str, str], int]
    exact: bool  # answers compared as exact strings (official) rather than as letter sets
    # answers whose letter set is right but whose spelling differs from the key ("CA", "ac", "A,C" for "AC"):
    # counted right only thanks to normalisation (default), or counted wrong for their spelling alone (exact)
    spelling_only: int

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "item_accuracy": self.item_accuracy,
            "by_type": self.by_type,
            "by_class": [{"exam_type": t, "exam_class": c, "accuracy": acc, "items": self.counts[(t, c)]}
                         for (t, c), acc in self.by_class.items()],
            "comparison": "exact strings (official score.py)" if self.exact else "letter sets (normalised)",
            "right_only_when_normalised": self.spelling_only,
        }


def is_right(predicted: str, key: AnswerKey, exact: bool) -> bool:
    """Exact: `model_answer == answer` as the official score.py compares. Default: the same letter set."""
    if exact:
        return predicted == (key.as_written or key.answer)
    letters = normalise_letters(predicted)
    return letters != "" and letters == normalise_letters(key.answer)


def score(predictions: dict[str, str], truth: list[AnswerKey], exact: bool = False) -> Score:
    """Score `predictions` (id -> answer) against answer keys: accuracy per exam_class, each exam_type the
    unweighted mean of its classes. A missing prediction counts as wrong, as in the official scorer."""
    right: dict[tuple[str, str], list[int]] = defaultdict(list)
    spelling_only = 0
    for key in truth:
        predicted = predictions.get(str(key.id), "")
        counted = is_right(predicted, key, exact)
        spelling_only += counted != is_right(predicted, key, not exact)
        right[(key.exam_type, key.exam_class)].append(int(counted))
    by_class = {group: sum(v) / len(v) for group, v in sorted(right.items())}
    classes_of_type: dict[str, list[float]] = defaultdict(list)
    for (exam_type, _), accuracy in by_class.items():
        classes_of_type[exam_type].append(accuracy)
    by_type = {t: sum(v) / len(v) for t, v in sorted(classes_of_type.items())}
    total = sum(len(v) for v in right.values())
    return Score(
        by_class=by_class,
        by_type=by_type,
        overall=sum(by_type.values()) / len(by_type) if by_type else 0.0,
        item_accuracy=sum(sum(v) for v in right.values()) / total if total else 0.0,
        counts={group: len(v) for group, v in right.items()},
        exact=exact,
        spelling_only=spelling_only,
    )


# -- answer files ------------------------------------------------------------------------------------------------

def read_model_answers(path: Path) -> dict[str, str]:
    """An answer file in the official format (`[{"id", "model_answer"}]`, or JSON Lines) -> id -> answer.

    Every problem (wrong field, duplicated id, not UTF-8) is collected with its line and raised as one DataError.
    """
    problems: list[Problem] = []
    answers: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, record in read_json_records(path, problems):
        problem = _answer_record_problem(record, first_line)
        if problem:
            problems.append(Problem(str(path), line, *problem))
            continue
        key = str(record["id"])
        first_line[key] = line
        answers[key] = record["model_answer"] or ""
    if not answers and not problems:
        problems.append(Problem(str(path), None, None, 'holds no answers (expected [{"id", "model_answer"}, ...])'))
    raise_if_problems(problems)
    return answers


def _answer_record_problem(record, first_line: dict[str, int]) -> tuple[str | None, str] | None:
    """(field, message) for a record of an answer file that cannot be scored, else None."""
    if not isinstance(record, dict):
        return None, f'expected an object {{"id", "model_answer"}}, got {type(record).__name__}'
    if "id" not in record or isinstance(record["id"], (bool, dict, list)) or str(record["id"]).strip() == "":
        return "id", "missing or not a string/integer"
    if "model_answer" not in record:
        hint = " (this record has `answer`: that is the answer key's field)" if "answer" in record else ""
        return "model_answer", f"missing; cmb-score expects the official answer-file field `model_answer`{hint}"
    if not isinstance(record["model_answer"], (str, type(None))):
        return "model_answer", f"expected a string of letters, got {type(record['model_answer']).__name__}"
    if str(record["id"]) in first_line:
        return "id", f"duplicated id {record['id']!r} (first at line {first_line[str(record['id'])]})"
    return None


def check_answer_keys(keys: list[AnswerKey], path: str) -> None:
    """An answer key that scores an item twice is refused, naming the file and line (an empty file is refused by
    the reader)."""
    seen: dict[str, str] = {}
    problems = []
    for key in keys:
        if key.id in seen:
            problems.append(Problem(key.source, None, "id", f"duplicated id {key.id!r} (first at {seen[key.id]})"))
        seen.setdefault(key.id, key.source)
        if not (key.exam_type and key.exam_class):
            problems.append(Problem(key.source, None, "exam_type", "the truth file needs exam_type and exam_class"))
    raise_if_problems(problems)

"""CMB-Exam: prompts in the official formats, answer extraction, and scoring identical to the official scorer.

Prompt stem (official): `以下是中国{exam_type}中{exam_class}考试的一道{question_type}，` followed by either
`不需要做任何分析和解释，直接输出答案选项。` (answer-only) or `请分析每个选项，并最后给出答案。` (chain of thought),
then the question and one `A. text` line per option.

Scoring (official): an item is right when the predicted letter set equals the answer's exactly (no partial
credit); accuracy per `exam_class`; each `exam_type` scores the unweighted mean of its classes.

Where the official code has quirks, `official=True` reproduces them for leaderboard comparison:
- options whose text is a single character are dropped from the prompt;
- when its answer pattern misses, every capital A–G anywhere in the reply is collected as the answer.
By default neither happens: every option is shown, and a reply with no recognisable answer scores as wrong.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from medtune.data.records import OPTION_LETTERS, ExamItem, normalise_letters

ANSWER_ONLY = "不需要做任何分析和解释，直接输出答案选项。"
CHAIN_OF_THOUGHT = "请分析每个选项，并最后给出答案。"


def shown_options(item: ExamItem, official: bool = False) -> dict[str, str]:
    """The options put in front of the model (the official scripts drop one-character options)."""
    return {k: v for k, v in item.options.items() if not (official and len(v.strip()) == 1)}


def item_prompt(item: ExamItem, cot: bool = False, official: bool = False) -> str:
    options = shown_options(item, official)
    lines = [f"以下是中国{item.exam_type}中{item.exam_class}考试的一道{item.question_type}，"
             f"{CHAIN_OF_THOUGHT if cot else ANSWER_ONLY}", item.question]
    lines += [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines)


def shot_reply(item: ExamItem, cot: bool) -> str:
    """The assistant turn of a few-shot example: the letters, or the explanation ending in the answer."""
    if cot and item.explanation:
        return f"{item.explanation.strip()}\n所以答案是{item.answer}。"
    return item.answer or ""


def item_messages(item: ExamItem, shots: list[ExamItem], cot: bool = False, official: bool = False) -> list[dict]:
    """The conversation sent to the model: few-shot examples as earlier turns, then the item."""
    messages: list[dict] = []
    for shot in shots:
        messages += [{"role": "user", "content": item_prompt(shot, cot, official)},
                     {"role": "assistant", "content": shot_reply(shot, cot)}]
    messages.append({"role": "user", "content": item_prompt(item, cot, official)})
    return messages


def pick_shots(val_items: list[ExamItem], item: ExamItem, count: int) -> list[ExamItem]:
    """The first `count` val items of the same exam_class (then of any class), in file order: deterministic."""
    if count <= 0:
        return []
    same = [v for v in val_items if v.exam_class == item.exam_class and v.id != item.id]
    rest = [v for v in val_items if v.exam_class != item.exam_class and v.id != item.id]
    return (same + rest)[:count]


# -- answer extraction ------------------------------------------------------------------------------------------

_OPEN, _CLOSE = r"[（(【\[*]*", r"[)）】\]*]*"
_ONE = rf"{_OPEN}[{OPTION_LETTERS}]{_CLOSE}"
# A letter is an answer only where a word could not continue it: "C。", "C，", "C)" -- not "B选项…" or "ACE抑制剂".
_END = r"(?=$|[\s。．.,，、:：;；!！?？]|\*)"
# Letters joined by 、 , / 和 及 与 or spaces on the same line: "A、C", "B和D", "A C" (never across a newline).
_LETTERS = rf"{_ONE}(?:[ \t]*[、,，/和及与]?[ \t]*{_ONE}(?={_CLOSE}{_END}|[ \t]*[、,，/和及与]?[ \t]*{_OPEN}[A-G]))*"
_CONNECT = r"(?:[ \t]*(?:应该是|应该为|应当是|应是|应为|是|为|：|:|选项|选))*[ \t]*"
# Strong cues state the answer; a bare 选 / 选择 also appears in "不选A", so it counts only when nothing stronger does.
_STRONG_CUE = re.compile(rf"(?:正确答案|正确选项|参考答案|最佳答案|答案|故选|应选|(?i:answer is|answer:|answer)){_CONNECT}"
                         rf"({_LETTERS}){_END}")
_WEAK_CUE = re.compile(rf"(?<!不)(?:选择|选){_CONNECT}({_LETTERS}){_END}")
# A reply that starts with its letters: "A", "A、C", "BD", "C。", "(B)", "B. 多西环素"
_LEADING = re.compile(rf"^\s*({_LETTERS}){_END}")
_OFFICIAL_CUE = re.compile(r"(答案|正确选项)(是|：|为|应该是|应该为)(.*)", re.S)


def extract_answer(reply: str, options: str = OPTION_LETTERS, official: bool = False) -> str:
    """The option letters a reply commits to ('' when it commits to none)."""
    if official:
        match = _OFFICIAL_CUE.search(reply)
        text = match.group(3) if match else reply
        return normalise_letters("".join(re.findall(r"[A-G]", text)))
    # chain-of-thought replies state their answer last, so the last cue wins
    found = next((cues[-1] for cues in (_STRONG_CUE.findall(reply), _WEAK_CUE.findall(reply)) if cues), None)
    if found is None:
        leading = _LEADING.match(reply)
        if not leading:
            return ""
        found = leading.group(1)
    letters = normalise_letters(found)
    return letters if letters and set(letters) <= set(options) else ""


# -- scoring -----------------------------------------------------------------------------------------------------

@dataclass
class Score:
    by_class: dict[tuple[str, str], float]  # (exam_type, exam_class) -> accuracy
    by_type: dict[str, float]  # exam_type -> mean of its classes
    overall: float  # mean of the exam types (the leaderboard's average)
    item_accuracy: float  # share of all items answered right
    counts: dict[tuple[str, str], int]

    def to_dict(self) -> dict:
        return {
            "overall": self.overall,
            "item_accuracy": self.item_accuracy,
            "by_type": self.by_type,
            "by_class": [{"exam_type": t, "exam_class": c, "accuracy": acc, "items": self.counts[(t, c)]}
                         for (t, c), acc in self.by_class.items()],
        }


def score(predictions: dict[str, str], truth: list) -> Score:
    """Score `predictions` (id -> letters) against answer keys (objects with id, exam_type, exam_class, answer).

    A missing prediction counts as wrong, as in the official scorer.
    """
    right: dict[tuple[str, str], list[int]] = defaultdict(list)
    for key in truth:
        predicted = normalise_letters(predictions.get(str(key.id), ""))
        right[(key.exam_type, key.exam_class)].append(int(predicted != "" and predicted == normalise_letters(key.answer)))
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
    )

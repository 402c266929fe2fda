"""The internal shapes every input format is converted into, and the converters that validate on the way.

- pretraining text  -> `TextDocument(text)`
- SFT conversations -> `Conversation(messages=[{role, content}, ...])`   (ShareGPT, OpenAI messages, Alpaca)
- preference pairs  -> `PreferencePair(prompt=[...messages], chosen, rejected)` (book, conversations, HF)

Each object carries `source` ("file:line") so any later error can name the record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLE_ALIASES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass
class TextDocument:
    text: str
    source: str = ""


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    source: str = ""


@dataclass
class PreferencePair:
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExamItem:
    """A CMB-Exam multiple-choice item; `answer` is None for a test item whose answers live in another file."""

    id: str
    exam_type: str
    exam_class: str
    question_type: str
    question: str
    options: dict[str, str]
    answer: str | None = None
    exam_subject: str = ""
    explanation: str = ""
    source: str = ""

    @property
    def multiple(self) -> bool:
        return self.question_type == MULTIPLE_CHOICE


@dataclass
class ClinCase:
    """A CMB-Clin case: a description and ordered questions with reference solutions."""

    id: str
    title: str
    description: str
    qa_pairs: list[dict[str, str]]
    source: str = ""


@dataclass
class AnswerKey:
    """One line of an answer file (`[{"id", "answer", "exam_type", "exam_class"}]`)."""

    id: str
    answer: str
    exam_type: str = ""
    exam_class: str = ""
    source: str = ""
    as_written: str = ""  # the answer exactly as the file spells it (official scoring compares strings)


SINGLE_CHOICE, MULTIPLE_CHOICE = "单项选择题", "多项选择题"
OPTION_LETTERS = "ABCDEFG"


class RecordProblem(Exception):
    """A record that cannot be converted; `field` names the offending key (dotted for nested ones)."""

    def __init__(self, field_name: str | None, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


# Which keys identify which format; checked in this order (preference formats first: they are supersets).
FORMAT_KEYS: dict[str, tuple[str, ...]] = {
    "preference": ("question", "response_chosen", "response_rejected"),
    "preference_conversations": ("conversations", "chosen", "rejected"),
    "preference_hf": ("prompt", "chosen", "rejected"),
    "sharegpt": ("conversations",),
    "openai": ("messages",),
    "alpaca": ("instruction",),
    "text": ("text",),
    "cmb_exam": ("question", "option"),
    "cmb_clin": ("QA_pairs",),
    "cmb_answers": ("id", "answer"),
}
FORMAT_KIND = {
    "preference": "preference", "preference_conversations": "preference", "preference_hf": "preference",
    "sharegpt": "sft", "openai": "sft", "alpaca": "sft", "text": "text",
    "cmb_exam": "exam", "cmb_clin": "clin", "cmb_answers": "answers",
}


def detect_format(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for name, keys in FORMAT_KEYS.items():
        if all(k in record for k in keys):
            return name
    return None


def _text(record: dict, key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    if key not in record or record[key] is None:
        if required:
            raise RecordProblem(key, "missing")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise RecordProblem(key, f"expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordProblem(key, "empty")
    return value


def _pairs(record: dict, key: str) -> list[dict[str, str]]:
    """A `history` of [question, answer] pairs -> alternating user/assistant messages."""
    value = record.get(key) or []
    if not isinstance(value, list):
        raise RecordProblem(key, f"expected a list of [question, answer] pairs, got {type(value).__name__}")
    messages = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise RecordProblem(f"{key}[{i}]", "expected a [question, answer] pair of non-empty strings")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    return messages


def check_turn_order(messages: list[dict[str, str]], key: str, *, end_with: str) -> None:
    """System (optional) first, then user and assistant strictly alternating, ending with `end_with`."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise RecordProblem(key, "no user or assistant turns")
    for i, message in enumerate(body):
        index = i + (len(messages) - len(body))
        expected = "user" if i % 2 == 0 else "assistant"
        article = "an" if expected == "assistant" else "a"
        if message["role"] == "system":
            raise RecordProblem(f"{key}[{index}]", "a system turn is only allowed first")
        if message["role"] != expected:
            raise RecordProblem(f"{key}[{index}]", f"expected {article} {expected} turn here, got two {message['role']} "
                                                   "turns in a row")
    if body[-1]["role"] != end_with:
        raise RecordProblem(key, f"must end with a{'n' if end_with == 'assistant' else ''} {end_with} turn")


def _messages(record: dict, key: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    if key not in record:
        raise RecordProblem(key, "missing")
    turns = record[key]
    if not isinstance(turns, list):
        raise RecordProblem(key, f"expected a list of turns, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordProblem(where, f"expected an object with {role_key!r} and {content_key!r}")
        role = turn.get(role_key)
        if role not in ROLE_ALIASES:
            raise RecordProblem(f"{where}.{role_key}", f"unknown role {role!r} (use one of "
                                                       f"{', '.join(sorted(ROLE_ALIASES))})")
        try:
            content = _text(turn, content_key)
        except RecordProblem as exc:
            raise RecordProblem(f"{where}.{exc.field}", exc.message) from None
        messages.append({"role": ROLE_ALIASES[role], "content": content})
    return messages


def to_document(record: dict) -> TextDocument:
    return TextDocument(_text(record, "text"))


def to_conversation(record: dict, fmt: str) -> Conversation:
    if fmt == "sharegpt":
        messages = _messages(record, "conversations", "from", "value")
        check_turn_order(messages, "conversations", end_with="assistant")
    elif fmt == "openai":
        messages = _messages(record, "messages", "role", "content")
        check_turn_order(messages, "messages", end_with="assistant")
    elif fmt == "alpaca":
        messages = _alpaca_prompt(record) + [{"role": "assistant", "content": _text(record, "output")}]
    else:
        raise RecordProblem(None, f"format {fmt!r} is not a conversation format")
    return Conversation(messages)


def _alpaca_prompt(record: dict) -> list[dict[str, str]]:
    """An Alpaca record's system prompt, history and question (instruction, plus input on its own line)."""
    system = _text(record, "system", required=False, allow_empty=True)
    query = _text(record, "instruction")
    extra_input = _text(record, "input", required=False, allow_empty=True)
    if extra_input.strip():
        query = f"{query}\n{extra_input}"
    messages = ([{"role": "system", "content": system}] if system.strip() else []) + _pairs(record, "history")
    return messages + [{"role": "user", "content": query}]


def _response(record: dict, key: str) -> str:
    """A chosen/rejected answer: a string, one assistant message, or a one-message list."""
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        content = value.get("value", value.get("content"))
        if not isinstance(content, str) or not content.strip():
            raise RecordProblem(key, "expected an assistant message with non-empty content")
        return content
    return _text(record, key)


def to_preference(record: dict, fmt: str) -> PreferencePair:
    if fmt == "preference":
        system = _text(record, "system", required=False, allow_empty=True)
        prompt = ([{"role": "system", "content": system}] if system.strip() else []) + _pairs(record, "history")
        prompt.append({"role": "user", "content": _text(record, "question")})
        chosen, rejected = _text(record, "response_chosen"), _text(record, "response_rejected")
    elif fmt in ("preference_conversations", "preference_hf"):
        key = "conversations" if fmt == "preference_conversations" else "prompt"
        if fmt == "preference_hf" and isinstance(record.get("prompt"), str):
            prompt = [{"role": "user", "content": _text(record, "prompt")}]
        else:
            role_key, content_key = ("from", "value") if fmt == "preference_conversations" else ("role", "content")
            prompt = _messages(record, key, role_key, content_key)
            check_turn_order(prompt, key, end_with="user")
        chosen, rejected = _response(record, "chosen"), _response(record, "rejected")
    else:
        raise RecordProblem(None, f"format {fmt!r} is not a preference format")
    return PreferencePair(prompt, chosen, rejected)


def _identifier(record: dict) -> str:
    value = record.get("id")
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int)) or str(value).strip() == "":
        raise RecordProblem("id", "missing" if value is None else "expected a non-empty string or integer")
    return str(value)


def normalise_letters(value: str) -> str:
    """'C,A' / 'ca' / 'A、C' -> 'AC': the sorted set of option letters."""
    return "".join(sorted({c for c in value.upper() if c in OPTION_LETTERS}))


def _answer(record: dict, key: str, options: dict[str, str] | None) -> str:
    raw = _text(record, key)
    letters = normalise_letters(raw)
    if not letters or any(not (c in OPTION_LETTERS or c in " ,，、") for c in raw.strip().upper()):
        raise RecordProblem(key, f"expected option letters such as 'B' or 'ACD', got {raw!r}")
    if options is not None and not set(letters) <= set(options):
        raise RecordProblem(key, f"{raw!r} names an option that does not exist (options: {''.join(sorted(options))})")
    return letters


def to_exam_item(record: dict) -> ExamItem:
    options = record.get("option")
    if not isinstance(options, dict) or not options:
        raise RecordProblem("option", "expected an object of letter: text, e.g. {\"A\": \"...\", \"B\": \"...\"}")
    for letter, text in options.items():
        if letter not in OPTION_LETTERS:
            raise RecordProblem(f"option.{letter}", f"option keys must be single letters {OPTION_LETTERS[0]}-"
                                                    f"{OPTION_LETTERS[-1]}")
        if not isinstance(text, str) or not text.strip():
            raise RecordProblem(f"option.{letter}", "expected non-empty text")
    question_type = _text(record, "question_type")
    if question_type not in (SINGLE_CHOICE, MULTIPLE_CHOICE):
        raise RecordProblem("question_type", f"expected {SINGLE_CHOICE} or {MULTIPLE_CHOICE}, got {question_type!r}")
    answer = _answer(record, "answer", options) if record.get("answer") not in (None, "") else None
    if answer is not None and question_type == SINGLE_CHOICE and len(answer) != 1:
        raise RecordProblem("answer", f"a {SINGLE_CHOICE} has exactly one answer, got {answer!r}")
    return ExamItem(
        id=_identifier(record), exam_type=_text(record, "exam_type"), exam_class=_text(record, "exam_class"),
        question_type=question_type, question=_text(record, "question"), options=dict(options),  # file order
        answer=answer, exam_subject=_text(record, "exam_subject", required=False, allow_empty=True),
        explanation=_text(record, "explanation", required=False, allow_empty=True),
    )


def to_clin_case(record: dict) -> ClinCase:
    pairs = record.get("QA_pairs")
    if not isinstance(pairs, list) or not pairs:
        raise RecordProblem("QA_pairs", "expected a non-empty list of {question, solution}")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise RecordProblem(f"QA_pairs[{i}]", "expected an object with question and solution")
        for key in ("question", "solution"):
            try:
                _text(pair, key)
            except RecordProblem as exc:
                raise RecordProblem(f"QA_pairs[{i}].{key}", exc.message) from None
    return ClinCase(_identifier(record), _text(record, "title", required=False, allow_empty=True),
                    _text(record, "description"), [{"question": p["question"], "solution": p["solution"]}
                                                   for p in pairs])


def to_answer_key(record: dict) -> AnswerKey:
    return AnswerKey(_identifier(record), _answer(record, "answer", None),
                     _text(record, "exam_type", required=False, allow_empty=True),
                     _text(record, "exam_class", required=False, allow_empty=True), as_written=record["answer"])


def convert(record: Any, fmt: str):
    """Convert one raw record of format `fmt` into its internal shape; raises `RecordProblem`."""
    if not isinstance(record, dict):
        raise RecordProblem(None, f"expected a JSON object, got {type(record).__name__}")
    kind = FORMAT_KIND[fmt]
    if kind == "text":
        return to_document(record)
    if kind == "sft":
        return to_conversation(record, fmt)
    if kind == "exam":
        return to_exam_item(record)
    if kind == "clin":
        return to_clin_case(record)
    if kind == "answers":
        return to_answer_key(record)
    return to_preference(record, fmt)


@dataclass
class Prompt:
    """Something to answer (`medtune predict`): messages ending with a user turn."""

    id: str | int
    messages: list[dict[str, str]]
    source: str = ""


PROMPT_FORMATS = ("prompt", "sharegpt", "openai", "alpaca")


def detect_prompt_format(record: Any) -> str | None:
    """A conversation format, or "prompt" for a plain {prompt[, system, id]} record."""
    fmt = detect_format(record)
    if fmt in PROMPT_FORMATS:
        return fmt
    return "prompt" if isinstance(record, dict) and "prompt" in record and fmt is None else None


def to_prompt(record: Any, fmt: str, line: int) -> Prompt:
    """The messages to answer. A conversation that ends with an assistant turn (a training record) is asked again
    from the user turn before it; an Alpaca `output` is ignored. The id is the record's `id`, else its line."""
    if not isinstance(record, dict):
        raise RecordProblem(None, f"expected a JSON object, got {type(record).__name__}")
    if "id" in record:
        _identifier(record)  # checks it; the output keeps it as written (a number stays a number)
    identifier = record.get("id", line)
    if fmt == "prompt":
        system = _text(record, "system", required=False, allow_empty=True)
        messages = [{"role": "system", "content": system}] if system.strip() else []
        return Prompt(identifier, messages + [{"role": "user", "content": _text(record, "prompt")}])
    if fmt == "alpaca":
        return Prompt(identifier, _alpaca_prompt(record))
    key, role_key, content_key = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role",
                                                                                             "content")
    messages = _messages(record, key, role_key, content_key)
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    check_turn_order(messages, key, end_with="user")
    return Prompt(identifier, messages)

"""`ChatTemplate`: the one place that turns messages into token ids and labels.

Training (SFT, DPO), evaluation, `medtune chat` and serving all go through the same object, so the prompt the
model is trained on is exactly the prompt it is given at inference.

Assistant-only labels are derived the same way for every template, with no `{% generation %}` markers needed
(GLM-4-9B-Chat's template has none): for each assistant turn, render the conversation up to it with
`add_generation_prompt=True` and up to its end; the text in between is the reply. The reply is extended over the
token that makes generation stop (e.g. `<|im_end|>`, or GLM-4's next `<|user|>` tag), and a stop token is
appended after the last reply when the template renders none, so the model learns to stop.

The rendered conversation is tokenized ONCE, as a whole, and a token is a target when it starts inside a reply's
character span. Tokenizing pieces separately would not do: a SentencePiece-style (Metaspace) tokenizer prepends
"▁" to every piece, so the training prompt would differ from the whole prompt inference tokenizes. A token that
starts in the prompt and ends in the reply (a generation prompt ending inside a token, e.g. "ASSISTANT: " before
"▁Rest") is refused: no single sequence could then match inference's prompt, which ends before that token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from medtune.errors import ConfigError
from medtune.templates.registry import ChatFormat, get_template

IGNORE_INDEX = -100


class TemplateError(ConfigError):
    """A chat template that cannot express a conversation (or breaks the prompt-prefix property)."""


@dataclass
class EncodedConversation:
    input_ids: list[int]
    labels: list[int]
    user_header_positions: list[int] = field(default_factory=list)  # filled when encode(mark_user_headers=True)

    @property
    def supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def missing_special_tokens(tokenizer, chat_format: ChatFormat) -> list[str]:
    """The family's special tokens that the template writes but the tokenizer does not encode as one token of
    their own (e.g. Qwen's <|im_start|> for a GLM-4 tokenizer)."""
    probe = [{"role": "system", "content": "甲"}, {"role": "user", "content": "乙"},
             {"role": "assistant", "content": "丙"}, {"role": "user", "content": "丁"}]
    text = tokenizer.apply_chat_template(probe, chat_template=chat_format.jinja, tokenize=False,
                                         add_generation_prompt=True)
    missing = []
    for token in sorted(chat_format.special_tokens, key=len, reverse=True):  # "<sop>" before "sop"
        if token not in text:
            continue
        text = text.replace(token, "\0")
        if tokenizer(token, add_special_tokens=False)["input_ids"] != [tokenizer.convert_tokens_to_ids(token)]:
            missing.append(token)
    return sorted(missing, key=chat_format.special_tokens.index)


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """`messages` with `system_prompt` put first when they bring no system message of their own (`--system_prompt`).

    Without one (None or blank) the messages are left as they are, so the template renders its own default, e.g.
    Qwen2.5's "You are Qwen, created by Alibaba Cloud..." when no system message is given."""
    if not system_prompt or not system_prompt.strip() or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


class ChatTemplate:
    """A tokenizer plus the Jinja chat template that renders conversations for it, and the system prompt given to
    conversations that have none (see `with_system_prompt`)."""

    def __init__(self, tokenizer, jinja: str, name: str, stop_strings: list[str], system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.jinja = jinja
        self.name = name
        self.stop_strings = [s for s in dict.fromkeys(stop_strings) if s]
        self.system_prompt = system_prompt

    @property
    def cache_parts(self) -> list[str]:
        """Everything of the template that decides a conversation's ids, for the tokenized-data cache keys."""
        system = [f"system_prompt={self.system_prompt}"] if self.system_prompt else []
        return [self.jinja, "|".join(self.stop_strings), *system]

    @classmethod
    def for_tokenizer(cls, tokenizer, name: str | None = None, stop_token_ids: list[int] | None = None,
                      system_prompt: str | None = None) -> ChatTemplate:
        """The named template (`--template`), else the tokenizer's own `chat_template`."""
        stops = [tokenizer.eos_token] + [tokenizer.convert_ids_to_tokens(i) for i in (stop_token_ids or [])]
        if name:
            chat_format = get_template(name)
            missing = missing_special_tokens(tokenizer, chat_format)
            if missing:
                raise TemplateError(
                    f"--template {name}: this tokenizer lacks the template's special tokens {', '.join(missing)}; "
                    "they would be trained on as ordinary text pieces. Use the template of the model's family, or "
                    "omit --template to use the tokenizer's own chat template")
            named_stops = [t for t in chat_format.stop_tokens if t in tokenizer.get_vocab()]
            return cls(tokenizer, chat_format.jinja, name, named_stops + stops, system_prompt)
        jinja = tokenizer.chat_template
        if isinstance(jinja, dict):  # some tokenizers ship several named templates
            jinja = jinja.get("default") or next(iter(jinja.values()))
        if not jinja:
            raise TemplateError("the tokenizer has no chat_template; pass --template NAME (glm4, chatglm3, qwen, "
                                "llama3, vicuna, alpaca)")
        return cls(tokenizer, jinja, "tokenizer", stops + stops_written_by(jinja, tokenizer), system_prompt)

    # -- text -------------------------------------------------------------------------------------------------

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(with_system_prompt(messages, self.system_prompt),
                                                  chat_template=self.jinja, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _stop_at(self, text: str, position: int) -> str | None:
        return next((s for s in self.stop_strings if text.startswith(s, position)), None)

    def reply_spans(self, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The training text and the character span of every assistant reply in it (stop token included)."""
        text = self.render(messages)
        spans: list[tuple[int, int]] = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            through_reply = self.render(messages[: index + 1])
            if not (text.startswith(prompt) and text.startswith(through_reply)):
                raise TemplateError(f"template {self.name!r} renders a conversation's prompt differently from the "
                                    "same prompt inside the full conversation; it cannot be used for training")
            start, end = len(prompt), len(through_reply)
            if message["content"].strip() not in text[start:end]:
                raise TemplateError(f"template {self.name!r} does not place assistant turn {index} right after its "
                                    "generation prompt; it cannot be used for training")
            if not any(text[start:end].rstrip().endswith(s) for s in self.stop_strings):
                stop = self._stop_at(text, end)
                if stop is None and end == len(text):
                    if not self.stop_strings:
                        raise TemplateError("the tokenizer has no EOS token and the model no generation stop "
                                            "tokens; set eos_token in tokenizer_config.json")
                    stop = self.stop_strings[0]
                    text += stop  # the template ends without a stop marker: teach the model to emit one
                if stop is not None:
                    end += len(stop)
            spans.append((start, end))
        return text, spans

    # -- ids ----------------------------------------------------------------------------------------------------

    # verbose=False: transformers warns "Token indices sequence length is longer than the specified maximum" for any
    # text longer than model_max_length; the stages cut records to their own limit and count what they cut.
    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] if text else []

    def _tokenize(self, text: str, spans: list[tuple[int, int]],
                  boundaries: tuple[int, ...] = ()) -> tuple[list[int], list[int]]:
        """Token ids of the whole `text` and the character offset at which each token starts. `boundaries`:
        further character positions whose tokens must start there (only slow tokenizers need to be told)."""
        if not getattr(self.tokenizer, "is_fast", False):
            return self._tokenize_pieces(text, spans, boundaries)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                                  verbose=False)
        starts = [start for start, _ in encoding["offset_mapping"]]
        for reply_start, _ in spans:
            straddling = [(s, e) for s, e in encoding["offset_mapping"] if s < reply_start < e]
            if straddling:
                s, e = straddling[0]
                raise TemplateError(
                    f"template {self.name!r}: its generation prompt ends inside the token {text[s:e]!r} of this "
                    f"tokenizer (prompt ...{text[max(0, reply_start - 20):reply_start]!r}), so training would see "
                    "another prompt than inference; use a template whose generation prompt ends at a token boundary")
        return encoding["input_ids"], starts

    def _tokenize_pieces(self, text: str, spans: list[tuple[int, int]],
                         boundaries: tuple[int, ...] = ()) -> tuple[list[int], list[int]]:
        """For slow tokenizers, which report no offsets (e.g. GLM-4's original tiktoken one): the pieces between
        reply boundaries one by one. Byte-level BPE tokenizers give the whole-text ids this way, as their
        pre-tokenizers split where a generation prompt ends (a newline or a special token)."""
        cuts = sorted({0, len(text), *boundaries, *(position for span in spans for position in span)})
        ids: list[int] = []
        starts: list[int] = []
        for start, end in zip(cuts, cuts[1:]):
            piece = self._ids(text[start:end])
            ids += piece
            starts += [start] * len(piece)
        return ids, starts

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """What inference feeds the model for `messages` (ending with a user turn)."""
        return self._ids(self.render(messages, add_generation_prompt=True))

    @cached_property
    def user_header(self) -> str:
        """The text the template writes between a finished turn and a user message's content (GLM-4's <|user|> and
        a newline, ChatML's <|im_start|>user and a newline), read off the rendering of a probe conversation; "" when
        the template does not render it that way."""
        before = self.render([{"role": "user", "content": "甲"}, {"role": "assistant", "content": "乙"}])
        after = self.render([{"role": "user", "content": "甲"}, {"role": "assistant", "content": "乙"},
                             {"role": "user", "content": "丙"}])
        if not after.startswith(before) or "丙" not in after[len(before):]:
            return ""
        return after[len(before):after.index("丙", len(before))]

    def user_header_spans(self, text: str, messages: list[dict[str, str]]) -> list[tuple[int, int]]:
        """The character span of each user turn's role header in the training `text` of `messages`."""
        header, spans = self.user_header, []
        for index, message in enumerate(messages):
            content = message["content"].strip()
            if not header or message["role"] != "user" or not content:
                continue
            through = self.render(messages[: index + 1])
            content_start = through.rfind(content)
            start = through.rfind(header, 0, max(content_start, 0))
            if text.startswith(through) and min(start, content_start) >= 0 \
                    and not through[start + len(header):content_start].strip():
                spans.append((start, content_start))
        return spans

    def encode(self, messages: list[dict[str, str]], train_on_prompt: bool = False,
               mark_user_headers: bool = False) -> EncodedConversation:
        """Token ids and labels: replies supervised, everything else -100 (unless `train_on_prompt`).
        `mark_user_headers` also lists the positions of the user turns' role header tokens (for per-turn cuts)."""
        text, spans = self.reply_spans(messages)
        headers = self.user_header_spans(text, messages) if mark_user_headers else []
        ids, starts = self._tokenize(text, spans, tuple(position for span in headers for position in span))
        header_positions = [index for index, offset in enumerate(starts)
                            if any(start <= offset < end for start, end in headers)]
        if train_on_prompt:
            return EncodedConversation(ids, list(ids), header_positions)
        labels = [token if any(start <= offset < end for start, end in spans) else IGNORE_INDEX
                  for token, offset in zip(ids, starts)]
        return EncodedConversation(ids, labels, header_positions)

    def prompt_and_reply(self, prompt: list[dict[str, str]], reply: str) -> tuple[str, str]:
        """The rendered prompt (exactly what inference renders) and the reply text that follows it in training,
        stop marker included; used for preference pairs."""
        text, spans = self.reply_spans(prompt + [{"role": "assistant", "content": reply}])
        start, end = spans[-1]
        return text[:start], text[start:end]

    def encode_reply(self, prompt: list[dict[str, str]], reply: str) -> tuple[list[int], list[int]]:
        """The prompt's ids (what inference tokenizes) and the reply's ids as they follow it, from one tokenization."""
        prompt_text, reply_text = self.prompt_and_reply(prompt, reply)
        span = (len(prompt_text), len(prompt_text) + len(reply_text))
        ids, starts = self._tokenize(prompt_text + reply_text, [span])
        cut = sum(offset < span[0] for offset in starts)
        return ids[:cut], ids[cut:]

    @property
    def head_ids(self) -> list[int]:
        """The tokens the tokenizer puts before any text (GLM-4's [gMASK]<sop>, Llama-3's <|begin_of_text|>)."""
        plain = self.tokenizer("x", add_special_tokens=False)["input_ids"]
        full = self.tokenizer("x", add_special_tokens=True)["input_ids"]
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)
        return full[:start]

    @property
    def stop_token_ids(self) -> list[int]:
        vocabulary = self.tokenizer.get_vocab()
        return [vocabulary[s] for s in self.stop_strings if s in vocabulary]


def stops_written_by(jinja: str, tokenizer) -> list[str]:
    """Registered stop markers that a template writes itself and the tokenizer holds as one added token: a Qwen base
    model whose eos and generation config name only <|endoftext|> still ends every turn of its own ChatML template
    with <|im_end|>, so generation must stop there too."""
    from medtune.templates.registry import TEMPLATES

    added = tokenizer.get_added_vocab()
    return [token for chat_format in TEMPLATES.values() for token in chat_format.stop_tokens
            if token in jinja and token in added]

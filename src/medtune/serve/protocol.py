"""The OpenAI wire format `medtune serve` speaks: request bodies (validated), error bodies, and the incremental
text of a reply (stop strings, streamed deltas)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, Field, StrictBool, field_validator

ROLES = ("system", "user", "assistant")


class ChatMessage(BaseModel):
    role: str
    content: str | list[dict] | None = None

    @field_validator("role")
    @classmethod
    def known_role(cls, role: str) -> str:
        if role not in ROLES:
            raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
        return role

    def text(self) -> str:
        """The content as plain text (OpenAI's list form: its text parts joined)."""
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """What chat and text completions share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)  # the newer OpenAI name of max_tokens
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def a_conversation(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if not messages:
            raise ValueError("messages must not be empty")
        if messages[-1].role != "user":
            raise ValueError("the last message must be from the user")
        return messages


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    # vLLM's field and default: the tokenizer's own special tokens ([gMASK]<sop>, BOS) go before the text, without
    # which GLM-4 degrades badly; false continues the text exactly as given. Strict: "false" or 0 is a 400.
    add_special_tokens: StrictBool = True

    @field_validator("prompt")
    @classmethod
    def some_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt


class ApiError(Exception):
    """An OpenAI-style error reply: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


class ReplyText:
    """One reply's text as its tokens arrive: decoded as a whole each time (a character may span tokens), cut at
    the first stop string, and released in deltas that never have to be taken back: a trailing incomplete
    character and a tail that could still become a stop string are held until the next token decides."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of `text` already released
        self.stopped = False  # a stop string was seen

    def add(self, token: int) -> None:
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [self.text.find(s) for s in self.stop_strings if s in self.text]
        if cuts:
            self.text, self.stopped = self.text[:min(cuts)], True

    def delta(self, final: bool = False) -> str:
        """The text not released yet that is certain (all of it when `final`)."""
        end = len(self.text)
        if not final and not self.stopped:
            end = len(self.text.rstrip("\ufffd"))
            end -= max((size for stop in self.stop_strings for size in range(1, min(len(stop) - 1, end) + 1)
                        if self.text[:end].endswith(stop[:size])), default=0)
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece


FinishReason = Literal["stop", "length"]

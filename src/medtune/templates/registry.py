"""Named chat formats for model families, used when a tokenizer lacks its own `chat_template`
and to give the embedded tiny models the exact conversation layout of the real family.

Each template is a Jinja string in the `apply_chat_template` convention. They are written so that rendering a
conversation's prompt with `add_generation_prompt=True` gives a byte-exact prefix of the full rendering, which is
what keeps training and inference from drifting apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from medtune.errors import ConfigError


@dataclass(frozen=True)
class ChatFormat:
    name: str
    jinja: str
    special_tokens: tuple[str, ...]  # added to the vocabulary of a tokenizer built for this family
    bos_token: str | None
    eos_token: str  # ends a document in pretraining and an assistant turn in generation
    pad_token: str
    stop_tokens: tuple[str, ...]  # generation stops on any of these
    prefix_tokens: tuple[str, ...] = ()  # what the family's tokenizer prepends with add_special_tokens=True


# GLM-4-9B-Chat: [gMASK]<sop><|system|>\n{system}<|user|>\n{query}<|assistant|>\n{answer}; replies end when the
# model emits the next role tag (<|user|> or <|observation|>).
GLM4 = ChatFormat(
    name="glm4",
    jinja=(
        "[gMASK]<sop>"
        "{% for message in messages %}"
        "<|{{ message['role'] }}|>\n{{ message['content'] }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    ),
    special_tokens=("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                    "<|assistant|>", "<|observation|>"),
    bos_token=None,
    eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
    stop_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
    prefix_tokens=("[gMASK]", "<sop>"),
)

# Qwen2 / Qwen2.5 (ChatML).
QWEN = ChatFormat(
    name="qwen",
    jinja=(
        "{% for message in messages %}"
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    bos_token=None,
    eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
    stop_tokens=("<|im_end|>", "<|endoftext|>"),
)

# Llama-3 instruct.
LLAMA3 = ChatFormat(
    name="llama3",
    jinja=(
        "<|begin_of_text|>"
        "{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"),
    bos_token="<|begin_of_text|>",
    eos_token="<|end_of_text|>",
    pad_token="<|end_of_text|>",
    stop_tokens=("<|eot_id|>", "<|end_of_text|>"),
    prefix_tokens=("<|begin_of_text|>",),
)

# ChatGLM3-6B: like GLM-4 but with the "sop" prefix token and a space (SentencePiece's dummy prefix) before each
# message. As in ChatGLM3 itself, the generation prompt ends with the <|assistant|> tag and the model writes the
# "\n " after it: a prompt ending in that space would end inside a SentencePiece token ("▁Rest").
CHATGLM3 = ChatFormat(
    name="chatglm3",
    jinja=(
        "[gMASK]sop"
        "{% for message in messages %}"
        "<|{{ message['role'] }}|>\n {{ message['content'] }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ),
    special_tokens=("<|endoftext|>", "[MASK]", "[gMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>"),
    bos_token=None,
    eos_token="<|endoftext|>",
    pad_token="<|endoftext|>",
    stop_tokens=("<|endoftext|>", "<|user|>", "<|observation|>"),
    prefix_tokens=("[gMASK]", "sop"),
)

# Vicuna v1.1 style, for base models without a chat template of their own. As in FastChat, the generation prompt
# is "ASSISTANT:" and the reply starts with the space: with SentencePiece tokenizers " Rest" is one token ("▁Rest"),
# so a prompt ending in the space would end inside it.
VICUNA = ChatFormat(
    name="vicuna",
    jinja=(
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }} "
        "{% elif message['role'] == 'user' %}USER: {{ message['content'] }} "
        "{% else %}ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    ),
    special_tokens=("<s>", "</s>"),
    bos_token="<s>",
    eos_token="</s>",
    pad_token="</s>",
    stop_tokens=("</s>",),
)

# Alpaca instruction format, for base models without a chat template of their own.
ALPACA = ChatFormat(
    name="alpaca",
    jinja=(
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
        "{% elif message['role'] == 'user' %}### Instruction:\n{{ message['content'] }}\n\n"
        "{% else %}### Response:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}### Response:\n{% endif %}"
    ),
    special_tokens=("<s>", "</s>"),
    bos_token="<s>",
    eos_token="</s>",
    pad_token="</s>",
    stop_tokens=("</s>",),
)

TEMPLATES: dict[str, ChatFormat] = {t.name: t for t in (GLM4, CHATGLM3, QWEN, LLAMA3, VICUNA, ALPACA)}


def get_template(name: str) -> ChatFormat:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"unknown template {name!r}; available: {', '.join(TEMPLATES)}") from None

"""One chat template for training and inference: exact assistant-only masks for every template, and the prompt
used in training is exactly what inference feeds the model."""

import re

import pytest
from transformers import AutoTokenizer

from medtune.data.loading import load_records
from medtune.models.loader import load_chat_template
from medtune.templates.chat import IGNORE_INDEX, ChatTemplate, TemplateError

from .conftest import REPO

MESSAGES = [
    {"role": "system", "content": "你是医生助手。"},
    {"role": "user", "content": "头痛怎么办？"},
    {"role": "assistant", "content": "先休息。"},
    {"role": "user", "content": "还是疼呢？"},
    {"role": "assistant", "content": "请及时就医。"},
]

# template -> (tiny model family, [(text, supervised?)...]) written out by hand from each family's format.
EXPECTED = {
    "glm4": ("glm4", [
        ("[gMASK]<sop><|system|>\n你是医生助手。<|user|>\n头痛怎么办？<|assistant|>\n", False),
        ("先休息。<|user|>", True),  # GLM-4 stops by emitting the next role tag
        ("\n还是疼呢？<|assistant|>\n", False),
        ("请及时就医。<|endoftext|>", True),  # nothing follows the last reply: EOS is appended and learned
    ]),
    "chatglm3": ("glm4", [
        ("[gMASK]sop<|system|>\n 你是医生助手。<|user|>\n 头痛怎么办？<|assistant|>", False),
        ("\n 先休息。<|user|>", True),  # as in ChatGLM3, the model writes the newline after its role tag
        ("\n 还是疼呢？<|assistant|>", False),
        ("\n 请及时就医。<|endoftext|>", True),
    ]),
    "qwen": ("qwen2", [
        ("<|im_start|>system\n你是医生助手。<|im_end|>\n<|im_start|>user\n头痛怎么办？<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("先休息。<|im_end|>\n", True),
        ("<|im_start|>user\n还是疼呢？<|im_end|>\n<|im_start|>assistant\n", False),
        ("请及时就医。<|im_end|>\n", True),
    ]),
    "llama3": ("llama", [
        ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n你是医生助手。<|eot_id|>"
         "<|start_header_id|>user<|end_header_id|>\n\n头痛怎么办？<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("先休息。<|eot_id|>", True),
        ("<|start_header_id|>user<|end_header_id|>\n\n还是疼呢？<|eot_id|>"
         "<|start_header_id|>assistant<|end_header_id|>\n\n", False),
        ("请及时就医。<|eot_id|>", True),
    ]),
    "vicuna": ("glm4", [
        ("你是医生助手。 USER: 头痛怎么办？ ASSISTANT:", False),
        (" 先休息。<|endoftext|>", True),  # as in FastChat, the reply starts with the space
        ("USER: 还是疼呢？ ASSISTANT:", False),
        (" 请及时就医。<|endoftext|>", True),
    ]),
    "alpaca": ("glm4", [
        ("你是医生助手。\n\n### Instruction:\n头痛怎么办？\n\n### Response:\n", False),
        ("先休息。<|endoftext|>\n\n", True),
        ("### Instruction:\n还是疼呢？\n\n### Response:\n", False),
        ("请及时就医。<|endoftext|>\n\n", True),
    ]),
}
OWN_TEMPLATE_EQUIVALENT = {"glm4": "glm4", "qwen2": "qwen", "llama": "llama3"}


def template_for(tiny_model, family: str, name: str | None) -> ChatTemplate:
    folder = tiny_model(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if name == "chatglm3":  # ChatGLM3's "sop"/"eop" are special tokens; GLM-4's are "<sop>"/"<eop>"
        tokenizer.add_special_tokens({"additional_special_tokens": ["sop", "eop"]},
                                     replace_extra_special_tokens=False)
    return load_chat_template(str(folder), tokenizer, name)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_exact_supervised_positions_on_a_multi_turn_conversation(tiny_model, name):
    family, segments = EXPECTED[name]
    template = template_for(tiny_model, family, name)
    tokenizer = template.tokenizer
    expected_ids, expected_labels = [], []
    for text, supervised in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        expected_ids += ids
        expected_labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    encoded = template.encode(MESSAGES)
    assert encoded.input_ids == expected_ids
    assert encoded.labels == expected_labels
    # train_on_prompt supervises everything
    assert template.encode(MESSAGES, train_on_prompt=True).labels == expected_ids


@pytest.mark.parametrize("family", sorted(OWN_TEMPLATE_EQUIVALENT))
def test_tokenizer_own_template_masks_like_the_named_one(tiny_model, family):
    own = template_for(tiny_model, family, None).encode(MESSAGES)
    named = template_for(tiny_model, family, OWN_TEMPLATE_EQUIVALENT[family]).encode(MESSAGES)
    assert (own.input_ids, own.labels) == (named.input_ids, named.labels)


@pytest.mark.parametrize("family", ["glm4", "qwen2", "llama"])
def test_training_prompt_is_byte_identical_to_inference_prompt(tiny_model, family):
    template = template_for(tiny_model, family, None)
    conversations, _ = load_records(REPO / "data" / "finetune", "sft")
    for conversation in conversations:
        messages = conversation.messages
        text, spans = template.reply_spans(messages)
        encoded = template.encode(messages)
        replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn, (start, _) in zip(replies, spans):
            inference_text = template.render(messages[:turn], add_generation_prompt=True)
            assert text[:start] == inference_text, conversation.source
        last_prompt = template.prompt_ids(messages[: replies[-1]])
        assert encoded.input_ids[: len(last_prompt)] == last_prompt, conversation.source
        assert encoded.labels[len(last_prompt) - 1] == IGNORE_INDEX  # the prompt's last token is not a target
        assert encoded.labels[len(last_prompt)] != IGNORE_INDEX  # the reply's first token is


def test_template_that_breaks_the_prompt_prefix_is_refused(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("glm4"))
    # renders a generation prompt that the full conversation never contains
    broken = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>\n\n{% endif %}")
    template = ChatTemplate(tokenizer, broken, "broken", [tokenizer.eos_token])
    with pytest.raises(TemplateError, match="renders a conversation's prompt differently"):
        template.encode(MESSAGES)


def test_tokenizer_without_template_asks_for_one(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("glm4"))
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="--template"):
        ChatTemplate.for_tokenizer(tokenizer)


@pytest.mark.parametrize("name, family, missing", [
    ("qwen", "glm4", "<|im_start|>, <|im_end|>"),
    ("llama3", "qwen2", "<|begin_of_text|>, <|start_header_id|>, <|end_header_id|>, <|eot_id|>"),
    ("glm4", "llama", "[gMASK], <sop>, <|system|>, <|user|>, <|assistant|>"),
    ("chatglm3", "glm4", "sop"),
])
def test_template_whose_special_tokens_the_tokenizer_lacks_is_refused(tiny_model, name, family, missing):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model(family))
    with pytest.raises(TemplateError, match=f"lacks the template's special tokens {re.escape(missing)};"):
        ChatTemplate.for_tokenizer(tokenizer, name)


def test_stop_markers_the_tokenizers_own_template_writes_are_stop_tokens(tiny_model):
    """A Qwen base model names only <|endoftext|> as eos (no generation-config stop ids), yet its own ChatML
    template ends every turn with <|im_end|>: generation and the saved generation_config must stop there too."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model("qwen2"))
    tokenizer.eos_token = "<|endoftext|>"
    template = ChatTemplate.for_tokenizer(tokenizer)
    im_end, end_of_text = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert template.stop_token_ids == [end_of_text, im_end]
    # the reply already ends with the template's own marker, so nothing is appended after it
    encoded = template.encode([{"role": "user", "content": "发热怎么办？"}, {"role": "assistant", "content": "多饮水。"}])
    supervised = [token for token, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    assert im_end in supervised and end_of_text not in supervised

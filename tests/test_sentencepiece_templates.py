"""Training and inference tokenize alike with a SentencePiece-style tokenizer (Metaspace pre-tokenizer, "▁" prepended
to the text), for every template: at every assistant turn the ids before the reply are exactly the ids inference
feeds the model for that prompt, and the labels cover exactly the reply's tokens.

The tokenizer is a small BPE trained offline on the bundled corpus, shaped like Llama-2's / ChatGLM3's: Metaspace
with `prepend_scheme` "first" (or "always", the legacy Llama behaviour that prepends after every special token),
newlines never merged (SentencePiece keeps them as byte-fallback tokens), every template's special tokens added.
"""

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from medtune.data.loading import load_records
from medtune.data.records import Conversation
from medtune.data.sft import encode_conversations
from medtune.models.tiny import corpus_texts
from medtune.templates import TEMPLATES
from medtune.templates.chat import IGNORE_INDEX, ChatTemplate, TemplateError

from .conftest import REPO

ENGLISH = ["Rest well and drink water.", "Take the tablets twice a day.", "Please see a doctor soon.",
           "USER: ASSISTANT: ### Instruction:\n### Response:\nsystem\nuser\nassistant\n"]
CONVERSATIONS = [
    [{"role": "system", "content": "你是医生助手。"},
     {"role": "user", "content": "I have a headache."},
     {"role": "assistant", "content": "Rest well and drink water."},
     {"role": "user", "content": "还是疼呢？"},
     {"role": "assistant", "content": "先休息。 Please see a doctor soon."},
     {"role": "user", "content": "How often?"},
     {"role": "assistant", "content": "Take the tablets twice a day."}],
]


def sentencepiece_tokenizer(prepend_scheme: str) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>"]
    specials += sorted({t for chat in TEMPLATES.values() for t in chat.special_tokens} - set(specials))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(prepend_scheme=prepend_scheme),
        pre_tokenizers.Split(Regex("\n"), behavior="isolated"),
    ])
    tokenizer.decoder = decoders.Metaspace(prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=3000, special_tokens=specials, show_progress=False)
    tokenizer.train_from_iterator(corpus_texts() + ENGLISH * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>", additional_special_tokens=specials[3:])


@pytest.fixture(scope="module", params=["first", "always"])
def tokenizer(request):
    return sentencepiece_tokenizer(request.param)


@pytest.fixture(scope="module")
def conversations():
    records, _ = load_records(REPO / "data" / "finetune", "sft")
    return CONVERSATIONS + [record.messages for record in records[:15]]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_training_ids_before_each_reply_are_the_inference_prompt_ids(tokenizer, conversations, name):
    template = ChatTemplate.for_tokenizer(tokenizer, name)
    for messages in conversations:
        encoded = template.encode(messages)
        text, spans = template.reply_spans(messages)
        expected_labels = [IGNORE_INDEX] * len(encoded.input_ids)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for turn, (_, end) in zip(turns, spans):
            prompt = template.prompt_ids(messages[:turn])
            assert encoded.input_ids[: len(prompt)] == prompt, (name, turn)
            # the reply: from the prompt's end to the end of the tokens of the text through the reply
            through_reply = tokenizer(text[:end], add_special_tokens=False)["input_ids"]
            assert encoded.input_ids[: len(through_reply)] == through_reply, (name, turn)
            assert len(through_reply) > len(prompt)
            expected_labels[len(prompt): len(through_reply)] = through_reply[len(prompt):]
        assert encoded.labels == expected_labels, name
        # preference pairs split prompt and reply the same way
        prompt_ids, reply_ids = template.encode_reply(messages[: turns[-1]], messages[turns[-1]]["content"])
        assert prompt_ids == template.prompt_ids(messages[: turns[-1]])
        assert prompt_ids + reply_ids == through_reply


def test_a_generation_prompt_ending_inside_a_token_is_refused_naming_the_record():
    tokenizer = sentencepiece_tokenizer("first")
    trailing_space = TEMPLATES["vicuna"].jinja.replace("ASSISTANT:{% endif %}", "ASSISTANT: {% endif %}")
    template = ChatTemplate(tokenizer, trailing_space, "vicuna-with-space", [tokenizer.eos_token])
    record = Conversation(CONVERSATIONS[0], source="chats.jsonl:7")
    with pytest.raises(TemplateError, match="^chats.jsonl:7: template 'vicuna-with-space': its generation prompt "
                                            "ends inside the token ' Rest'"):
        encode_conversations([record], template, max_length=512)

"""`--system_prompt`: one option (sft, dpo, eval, chat, serve, predict, and the pipeline's sections) that puts a
system message first in conversations that have none; unset, every rendering is byte-identical to before."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from medtune.config import (
    AdapterArguments,
    ChatArguments,
    EvalArguments,
    GenerationArguments,
    ModelArguments,
    parse_arguments,
)
from medtune.config.args import DEFAULT_SYSTEM_PROMPT
from medtune.errors import ConfigError
from medtune.models.loader import load_chat_template
from medtune.templates.chat import IGNORE_INDEX, ChatTemplate

SYSTEM = "你是医生。"
QUESTION = [{"role": "user", "content": "头痛？"}]
TURN = [*QUESTION, {"role": "assistant", "content": "休息。"}]
OWN_SYSTEM = [{"role": "system", "content": "你是药师。"}, *TURN]


@pytest.fixture(scope="module")
def tokenizer(glm4_dir):
    return AutoTokenizer.from_pretrained(glm4_dir)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_sft_ids_gain_the_system_prompt_and_never_label_it(glm4_dir, tokenizer):
    plain = load_chat_template(str(glm4_dir), tokenizer).encode(TURN)
    # unset: exactly the ids of the conversation as written (what medtune rendered before the option)
    assert plain.input_ids == ids(tokenizer, "[gMASK]<sop><|user|>\n头痛？<|assistant|>\n休息。<|endoftext|>")
    with_system = load_chat_template(str(glm4_dir), tokenizer, system_prompt=SYSTEM).encode(TURN)
    assert with_system.input_ids == ids(
        tokenizer, f"[gMASK]<sop><|system|>\n{SYSTEM}<|user|>\n头痛？<|assistant|>\n休息。<|endoftext|>")
    added = len(with_system.input_ids) - len(plain.input_ids)
    assert added == len(ids(tokenizer, f"<|system|>\n{SYSTEM}"))
    # the system tokens are prompt (never labelled); the reply's labels are the same tokens as without it
    assert with_system.labels[: 2 + added] == [IGNORE_INDEX] * (2 + added)
    assert with_system.labels[2 + added:] == plain.labels[2:]


def test_a_record_with_its_own_system_message_keeps_it(glm4_dir, tokenizer):
    own = load_chat_template(str(glm4_dir), tokenizer).encode(OWN_SYSTEM)
    assert load_chat_template(str(glm4_dir), tokenizer, system_prompt=SYSTEM).encode(OWN_SYSTEM) == own
    assert ids(tokenizer, SYSTEM) != ids(tokenizer, "你是药师。")


def test_blank_system_prompt_adds_nothing(glm4_dir, tokenizer):
    plain = load_chat_template(str(glm4_dir), tokenizer).prompt_ids(QUESTION)
    assert load_chat_template(str(glm4_dir), tokenizer, system_prompt=" ").prompt_ids(QUESTION) == plain


def test_unset_keeps_the_templates_own_default_system(tokenizer):
    """A template with a default system message (as Qwen2.5's writes "You are Qwen...") keeps it when the option
    is unset, and renders the option instead when it is given."""
    jinja = ("[gMASK]<sop>{% if messages[0]['role'] != 'system' %}<|system|>\nDEFAULT{% endif %}"
             "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    unset = ChatTemplate(tokenizer, jinja, "with-default", [tokenizer.eos_token])
    assert unset.render(QUESTION, add_generation_prompt=True) == \
        "[gMASK]<sop><|system|>\nDEFAULT<|user|>\n头痛？<|assistant|>\n"
    given = ChatTemplate(tokenizer, jinja, "with-default", [tokenizer.eos_token], system_prompt=SYSTEM)
    assert given.render(QUESTION, add_generation_prompt=True) == \
        f"[gMASK]<sop><|system|>\n{SYSTEM}<|user|>\n头痛？<|assistant|>\n"


def test_dpo_prompt_ids_contain_it_and_answers_do_not_move(glm4_dir, tokenizer):
    from medtune.data.preference import encode_pairs
    from medtune.data.records import PreferencePair

    pair = PreferencePair(prompt=QUESTION, chosen="多休息，必要时就医。", rejected="不用管。")
    plain, _ = encode_pairs([pair], load_chat_template(str(glm4_dir), tokenizer), 256)
    given, _ = encode_pairs([pair], load_chat_template(str(glm4_dir), tokenizer, system_prompt=SYSTEM), 256)
    assert plain[0]["prompt_ids"] == ids(tokenizer, "[gMASK]<sop><|user|>\n头痛？<|assistant|>\n")
    assert given[0]["prompt_ids"] == ids(tokenizer, f"[gMASK]<sop><|system|>\n{SYSTEM}<|user|>\n头痛？<|assistant|>\n")
    assert (given[0]["chosen_ids"], given[0]["rejected_ids"]) == (plain[0]["chosen_ids"], plain[0]["rejected_ids"])


def test_sft_and_dpo_caches_are_keyed_by_it(glm4_dir, tokenizer):
    plain = load_chat_template(str(glm4_dir), tokenizer)
    assert plain.cache_parts == [plain.jinja, "|".join(plain.stop_strings)]  # unset: the cache keys of before
    assert load_chat_template(str(glm4_dir), tokenizer, system_prompt=SYSTEM).cache_parts[-1] == \
        f"system_prompt={SYSTEM}"


def test_eval_prompts_contain_it_in_both_modes_and_it_keys_the_resume(glm4_dir, tokenizer):
    from medtune.eval.backends import Choice
    from medtune.eval.runner import make_backend, model_settings

    model_args, eval_args = parse_arguments((ModelArguments, EvalArguments), [
        "--model", str(glm4_dir), "--system_prompt", SYSTEM])
    backend = make_backend(model_args, eval_args)
    expected = ids(tokenizer, f"[gMASK]<sop><|system|>\n{SYSTEM}<|user|>\n头痛？<|assistant|>\n")
    assert backend.template.prompt_ids(QUESTION) == expected  # generate mode (and CMB-Clin) renders this
    plan = backend.scoring_plans([Choice(QUESTION, "AB", False)])[0]
    assert plan.context[: len(expected)] == expected  # likelihood mode scores the answers after it
    assert model_settings(model_args, eval_args, generates=False)["system_prompt"] == SYSTEM
    unset = parse_arguments((ModelArguments, EvalArguments), ["--model", str(glm4_dir)])
    assert "system_prompt" not in model_settings(*unset, generates=False)  # earlier runs' answers stay reusable


def test_endpoint_requests_carry_it_unless_the_conversation_has_a_system_message(monkeypatch):
    from medtune.eval.backends import EndpointBackend

    backend = EndpointBackend("http://127.0.0.1:9", system_prompt=SYSTEM, max_retries=0)
    sent = []

    def create(**request):
        sent.append(request["messages"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(backend.client.chat.completions, "create", create)
    for messages in (QUESTION, OWN_SYSTEM[:2]):
        with pytest.raises(RuntimeError):
            backend._one(messages, 4)
    assert sent == [[{"role": "system", "content": SYSTEM}, *QUESTION], OWN_SYSTEM[:2]]


def test_ppl_refuses_it(glm4_dir):
    from medtune.eval.runner import run_perplexity

    model_args, eval_args = parse_arguments((ModelArguments, EvalArguments), [
        "--model", str(glm4_dir), "--system_prompt", SYSTEM])
    with pytest.raises(ConfigError, match="ppl scores raw text"):
        run_perplexity(model_args, eval_args)


def test_chat_keeps_its_own_default_through_the_shared_option():
    types = (ModelArguments, AdapterArguments, GenerationArguments, ChatArguments)
    assert parse_arguments(types, [])[-1].system_prompt == DEFAULT_SYSTEM_PROMPT
    assert parse_arguments(types, ["--system_prompt", SYSTEM])[-1].system_prompt == SYSTEM
    assert parse_arguments(types, ["--system_prompt", ""])[-1].system_prompt == ""


def test_predict_uses_it_for_records_without_a_system_message(glm4_dir, tmp_path, tokenizer, monkeypatch):
    """The prompt ids predict feeds the model hold the system prompt (a record's own system message wins); the
    replies are those of the evaluation's backend for the same conversations."""
    import json

    from medtune.config import PredictArguments
    from medtune.eval.backends import LocalBackend
    from medtune.serve.predict import run_predict

    fed = []
    prompt_ids = ChatTemplate.prompt_ids
    monkeypatch.setattr(ChatTemplate, "prompt_ids", lambda self, messages: fed.append(prompt_ids(self, messages))
                        or fed[-1])

    source = tmp_path / "prompts.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": "头痛？"}, ensure_ascii=False) + "\n"
                      + json.dumps({"id": "b", "prompt": "头痛？", "system": "你是药师。"}, ensure_ascii=False) + "\n",
                      encoding="utf-8")
    output = tmp_path / "replies.jsonl"
    types = (ModelArguments, AdapterArguments, GenerationArguments, PredictArguments)
    run_predict(*parse_arguments(types, ["--model", str(glm4_dir), "--input", str(source), "--output", str(output),
                                         "--max_new_tokens", "6", "--system_prompt", SYSTEM]))
    assert fed == [ids(tokenizer, f"[gMASK]<sop><|system|>\n{system}<|user|>\n头痛？<|assistant|>\n")
                   for system in (SYSTEM, "你是药师。")]
    replies = {r["id"]: r["replies"] for r in map(json.loads, output.read_text(encoding="utf-8").splitlines())}
    reference = LocalBackend(str(glm4_dir)).generate(
        [[{"role": "system", "content": SYSTEM}, *QUESTION], [{"role": "system", "content": "你是药师。"}, *QUESTION]],
        max_new_tokens=6)
    assert [replies["a"], replies["b"]] == [[reference[0]], [reference[1]]]


@pytest.mark.parametrize("section", ["sft", "dpo", "eval"])
def test_pipeline_sections_take_it(tmp_path, section):
    from medtune.pipeline.config import parse_plan

    config = tmp_path / "pipeline.yaml"
    config.write_text(f"stages: [sft, dpo, eval]\n{section}:\n  system_prompt: {SYSTEM}\n", encoding="utf-8")
    parsed = parse_plan(["--config", str(config), "--output_dir", str(tmp_path / "out")]).parse(section)
    assert [c.system_prompt for c in parsed if hasattr(c, "system_prompt")] == [SYSTEM]


@pytest.mark.parametrize(("sections", "expected"), [
    ({"sft": SYSTEM}, SYSTEM),                           # eval inherits the trained-with prompt
    ({"sft": "甲", "dpo": "乙"}, "乙"),                   # the last training stage's (the final model's)
    ({"sft": SYSTEM, "eval": "''"}, ""),                  # eval's own, even empty, wins
    ({}, None),                                          # nothing set: the template's default, as before
])
def test_the_pipeline_evaluates_with_the_system_prompt_the_models_were_trained_with(tmp_path, sections, expected):
    from medtune.pipeline.config import parse_plan
    from medtune.pipeline.run import Pipeline

    config = tmp_path / "pipeline.yaml"
    body = "".join(f"{name}:\n  system_prompt: {value}\n" for name, value in sections.items())
    config.write_text(f"stages: [sft, dpo, eval]\n{body}", encoding="utf-8")
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out")]
    pipeline = Pipeline(parse_plan(argv), argv)
    assert pipeline.sections["eval"][0].system_prompt == expected

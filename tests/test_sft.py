"""`medtune sft`: packing is exact, the stage runs on GLM-4 and Qwen2 tiny models, bad records stop it, and the
model learns what it is taught."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune.config import parse_arguments
from medtune.data.collators import PackedCollator, PaddingCollator
from medtune.data.loading import load_records
from medtune.data.sft import best_fit_bins, encode_conversations, pack_examples
from medtune.errors import ConfigError
from medtune.models.loader import load_chat_template
from medtune.stages import sft

from .conftest import REPO, run_medtune

TINY = ["--config", str(REPO / "configs" / "sft_tiny.yaml")]


@pytest.fixture(scope="module")
def conversations():
    records, _ = load_records(REPO / "data" / "finetune", "sft")
    return records


def test_best_fit_bins_respect_capacity_and_place_everything():
    lengths = [5, 9, 3, 7, 1, 8, 2, 6, 4, 10]
    bins = best_fit_bins(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 6  # 55 tokens need at least 6 bins of 10


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("one_row", [False, True], ids=["stacked", "one_row"])
def test_packed_loss_equals_conversations_run_one_by_one(tiny_model, conversations, attention, one_row):
    folder = tiny_model("glm4")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = load_chat_template(str(folder), tokenizer)
    examples, _ = encode_conversations(conversations[:6], template, max_length=512)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attention, dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    with torch.no_grad():
        rows = pack_examples(examples, capacity=700)
        assert len(rows) >= 2 and any(r["position_ids"].count(0) >= 2 for r in rows)  # several rows, shared rows
        packed = PackedCollator(tokenizer.pad_token_id, one_row=one_row)(rows)
        tokens = sum(len(e["input_ids"]) for e in examples)
        if one_row:
            assert packed["input_ids"].shape == (1, tokens)  # joined, no padding
        else:
            assert packed["input_ids"].shape == (len(rows), max(len(r["input_ids"]) for r in rows))
        packed_loss = model(**packed).loss.item()
        total, count = 0.0, 0
        for example in examples:
            single = PaddingCollator(tokenizer.pad_token_id)([example])
            n = int((single["labels"][0, 1:] != -100).sum())
            total += model(**single).loss.item() * n
            count += n
    assert packed_loss == pytest.approx(total / count, abs=1e-4)
    # the Trainer normalises the loss by the targets it counts (labels[..., 1:]): exactly the supervised tokens
    assert int((packed["labels"][..., 1:] != -100).sum()) == count


def test_packed_batches_keep_every_token_and_pad_only_stacked_rows(tiny_model, conversations):
    folder = tiny_model("glm4")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = load_chat_template(str(folder), tokenizer)
    examples, stats = encode_conversations(conversations, template, max_length=512)
    rows = pack_examples(examples, capacity=512)
    assert sum(len(r["input_ids"]) for r in rows) == stats.tokens  # nothing lost or duplicated
    supervised = {}
    for one_row in (True, False):
        batches = [PackedCollator(tokenizer.pad_token_id, one_row=one_row)(rows[i:i + 4])
                   for i in range(0, len(rows), 4)]
        computed = sum(b["input_ids"].numel() for b in batches)
        supervised[one_row] = sum(int((b["labels"] != -100).sum()) for b in batches)
        if one_row:
            assert computed == stats.tokens  # joined batches compute no padding at all
        else:
            # stacked rows pad to the batch's longest row; best-fit-decreasing packing leaves little of it
            assert stats.tokens < computed and stats.tokens / computed > 0.9
    assert supervised[True] == supervised[False] > 0  # the same targets either way


@pytest.mark.parametrize("arch", ["glm4", "qwen2"])
def test_sft_cli_writes_adapter_checkpoints_and_tensorboard(tiny_model, tmp_path, arch):
    out = tmp_path / arch
    result = run_medtune("sft", *TINY, "--model_name_or_path", str(tiny_model(arch)), "--output_dir", str(out),
                         "--max_steps", "6", "--eval_steps", "3", "--save_steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-6").is_dir()
    assert list((out / "runs").glob("events.out.tfevents.*"))
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["packing"] and stats["train"]["supervised_tokens"] > 0
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_before_training"]


def test_sft_without_packing_and_with_a_forced_template(tiny_model, tmp_path):
    out = tmp_path / "o"
    result = run_medtune("sft", *TINY, "--model_name_or_path", str(tiny_model("glm4")), "--output_dir", str(out),
                         "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--packing", "false",
                         "--template", "vicuna", "--neftune_noise_alpha", "5")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = AutoTokenizer.from_pretrained(out)
    assert "ASSISTANT" in saved.chat_template  # the forced template is what chat/serve will use


@pytest.mark.parametrize("record, expected", [
    ({"conversations": [{"from": "doctor", "value": "x"}, {"from": "gpt", "value": "y"}]},
     ":2: conversations[0].from: unknown role 'doctor'"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": " "}]},
     ":2: conversations[1].value: empty"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "human", "value": "y"},
                        {"from": "gpt", "value": "z"}]}, ":2: conversations[1]: expected an assistant turn"),
    ({"id": 7}, ":2: conversations: missing"),
])
def test_bad_conversation_records_stop_sft_with_exit_code_2(tiny_model, tmp_path, record, expected):
    data = tmp_path / "data.jsonl"
    good = {"conversations": [{"from": "human", "value": "头痛？"}, {"from": "gpt", "value": "休息。"}]}
    data.write_text(json.dumps(good, ensure_ascii=False) + "\n" + json.dumps(record, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    out = tmp_path / "out"
    result = run_medtune("sft", "--model_name_or_path", str(tiny_model("glm4")), "--train_file_dir", str(data),
                         "--output_dir", str(out), "--max_steps", "1")
    assert result.returncode == 2
    assert f"medtune: error: {data}{expected}" in result.stderr
    assert "Traceback" not in result.stderr and not list(out.glob("checkpoint-*"))


def test_model_learns_to_answer_trained_questions(tiny_model, conversations, tmp_path):
    subset = [c for c in conversations if len(c.messages) <= 3][:4]
    data = tmp_path / "subset.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for conversation in subset:
            handle.write(json.dumps({"messages": conversation.messages}, ensure_ascii=False) + "\n")
    out = tmp_path / "out"
    args = parse_arguments(sft.ARGUMENT_TYPES, [
        "--model_name_or_path", str(tiny_model("glm4")), "--train_file_dir", str(data), "--output_dir", str(out),
        "--use_peft", "false", "--learning_rate", "2e-3", "--lr_scheduler_type", "constant", "--max_steps", "60",
        "--per_device_train_batch_size", "4", "--validation_split_percentage", "0", "--save_strategy", "no",
        "--report_to", "none", "--logging_steps", "10"])
    sft.run_sft(*args)
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    losses = [e["loss"] for e in history if "loss" in e]
    assert losses[-1] < losses[0] / 3  # training loss falls clearly

    model = AutoModelForCausalLM.from_pretrained(out)
    template = load_chat_template(str(out), AutoTokenizer.from_pretrained(out))
    for conversation in subset:
        prompt = conversation.messages[:-1]
        ids = template.prompt_ids(prompt)
        output = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                eos_token_id=template.stop_token_ids, pad_token_id=template.tokenizer.pad_token_id)
        reply = template.tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)
        assert conversation.messages[-1]["content"].startswith(reply[:8]) and len(reply) >= 8, (reply, conversation.source)
    shutil.rmtree(out)


def test_truncation_drops_and_counts_conversations_with_nothing_left_to_learn(tiny_model):
    from medtune.data.records import Conversation

    folder = tiny_model("glm4")
    template = load_chat_template(str(folder), AutoTokenizer.from_pretrained(folder))
    long_question = Conversation([{"role": "user", "content": "请解释高血压的分级标准。" * 40},
                                  {"role": "assistant", "content": "按诊室血压分为三级。"}])
    short = Conversation([{"role": "user", "content": "头痛？"}, {"role": "assistant", "content": "休息。" * 30}])
    examples, stats = encode_conversations([long_question, short], template, max_length=40)
    assert stats.dropped_no_supervised_token == 1 and stats.truncated == 1
    assert len(examples) == 1 and len(examples[0]["input_ids"]) == 40
    assert any(label != -100 for label in examples[0]["labels"][1:])


def test_long_conversations_encode_without_the_tokenizers_length_warning(tiny_model, monkeypatch):
    """A conversation longer than the tokenizer's model_max_length is cut to max_length and counted; transformers'
    own 'Token indices sequence length is longer' warning would only alarm users."""
    from transformers import tokenization_utils_base

    from medtune.data.records import Conversation

    warnings = []
    monkeypatch.setattr(tokenization_utils_base.logger, "warning", lambda message, *a, **k: warnings.append(message))
    folder = tiny_model("glm4")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.model_max_length = 16
    template = load_chat_template(str(folder), tokenizer)
    long_reply = Conversation([{"role": "user", "content": "头痛怎么办？"},
                               {"role": "assistant", "content": "建议休息并监测血压。" * 20}])
    examples, stats = encode_conversations([long_reply], template, max_length=48)
    assert stats.truncated == 1 and len(examples[0]["input_ids"]) == 48
    assert not [w for w in warnings if "Token indices sequence length" in w]


def test_sft_resumes_from_its_latest_checkpoint(tiny_model, tmp_path):
    def run(max_steps: str, *extra: str):
        sft.run_sft(*parse_arguments(sft.ARGUMENT_TYPES, [
            *TINY, "--model_name_or_path", str(tiny_model("glm4")), "--output_dir", str(tmp_path), "--max_steps",
            max_steps, "--save_steps", "2", "--eval_strategy", "no", "--report_to", "none", "--logging_steps", "1",
            *extra]))

    run("2")
    run("4", "--resume_from_checkpoint", "true")
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3, 4]  # steps 1-2 from the first run, 3-4 resumed
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_encoded_conversations_are_cached_once(tiny_model, conversations, tmp_path):
    from medtune.data.sft import build_sft_split

    folder = tiny_model("glm4")
    template = load_chat_template(str(folder), AutoTokenizer.from_pretrained(folder))
    (_, _, data_args, _) = parse_arguments(sft.ARGUMENT_TYPES, ["--data_cache_dir", str(tmp_path),
                                                                 "--model_max_length", "512"])
    first, first_stats = build_sft_split(conversations[:20], template, data_args)
    entries = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    second, second_stats = build_sft_split(conversations[:20], template, data_args)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == entries and len(entries) == 1
    assert first["input_ids"] == second["input_ids"] and first_stats == second_stats
    build_sft_split(conversations[:19], template, data_args)  # other data, other entry
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2


def test_template_whose_special_tokens_the_tokenizer_lacks_stops_sft_before_writing(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = run_medtune("sft", *TINY, "--model_name_or_path", str(tiny_model("glm4")), "--output_dir", str(out),
                         "--template", "qwen")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "lacks the template's special tokens <|im_start|>, <|im_end|>" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.slow
def test_label_only_head_trains_with_the_standard_loss(tiny_model, tmp_path, monkeypatch):
    """--loss_only_labels (the default) runs the LM head only at supervised tokens: the same logged losses and
    gradient norms as transformers' own loss, step for step."""
    from medtune.stages import logprobs

    calls = []
    original = logprobs.loss_at_labelled_positions
    monkeypatch.setattr(logprobs, "loss_at_labelled_positions", lambda *a, **k: calls.append(1) or original(*a, **k))

    def history(flag: str) -> list[tuple[float, float]]:
        out = tmp_path / flag
        sft.run_sft(*parse_arguments(sft.ARGUMENT_TYPES, [
            *TINY, "--model_name_or_path", str(tiny_model("qwen2")), "--output_dir", str(out), "--max_steps", "3",
            "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none", "--logging_steps", "1",
            "--learning_rate", "1e-3", "--loss_only_labels", flag]))
        log = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [value for e in log if "loss" in e for value in (e["loss"], e["grad_norm"])]

    standard = history("false")
    assert calls == []
    label_only = history("true")
    assert len(calls) == 3
    assert label_only == pytest.approx(standard, abs=1e-5)


# Per family: (max_source, max_target), the user role header, the generation prompt, the stop tail of a reply that
# another turn follows and of the last reply, and how many question tokens each cut source keeps.
TURN_CUTS = {
    # GLM-4: the stop of a reply is the next turn's <|user|> tag (labelled), so turn 2's source starts at its "\n"
    "glm4": ((8, 3), "[gMASK]<sop>", "<|user|>\n", "<|assistant|>\n", "<|user|>", "<|endoftext|>", (2, 5)),
    # ChatML: a reply ends "<|im_end|>\n", and every user turn starts with its own <|im_start|>user header
    "qwen2": ((22, 4), "", "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>\n",
              "<|im_end|>\n", (3, 3)),
}


@pytest.mark.parametrize("family", sorted(TURN_CUTS))
def test_max_source_and_target_length_cut_each_turn_as_medicalgpt_names_them(tiny_model, family):
    """A cut source keeps the template's leading tokens, the user role header and its end; a cut reply keeps its
    start and its stop token (labelled), so no turn runs into the next one without a turn marker."""
    from medtune.data.records import Conversation

    folder = tiny_model(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    template = load_chat_template(str(folder), tokenizer)
    (max_source, max_target), head, header, generation, stop, last_stop, (kept_1, kept_2) = TURN_CUTS[family]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    question_1, question_2, reply_1, reply_2 = "请解释高血压的分级标准。" * 3, "头痛该怎么办？" * 2, "休息。" * 5, "多喝水。" * 3
    conversation = Conversation([{"role": "user", "content": question_1}, {"role": "assistant", "content": reply_1},
                                 {"role": "user", "content": question_2}, {"role": "assistant", "content": reply_2}])
    examples, stats = encode_conversations([conversation], template, max_length=128, max_source=max_source,
                                           max_target=max_target)
    # the second user header lies in turn 2's source, except what the previous reply's stop already wrote
    header_2 = ids(header)[len(ids(stop)) if header.startswith(stop) else 0:]
    source_1 = ids(head) + ids(header) + ids(question_1)[-kept_1:] + ids(generation)
    source_2 = header_2 + ids(question_2)[-kept_2:] + ids(generation)
    cut_reply_1 = ids(reply_1)[:max_target - len(ids(stop))] + ids(stop)
    cut_reply_2 = ids(reply_2)[:max_target - len(ids(last_stop))] + ids(last_stop)
    assert len(source_1) == len(source_2) == max_source and len(cut_reply_1) == len(cut_reply_2) == max_target
    assert examples[0]["input_ids"] == source_1 + cut_reply_1 + source_2 + cut_reply_2
    assert examples[0]["labels"] == [-100] * max_source + cut_reply_1 + [-100] * max_source + cut_reply_2
    assert stats.truncated == 1 and stats.dropped_no_supervised_token == 0
    on_prompt, _ = encode_conversations([conversation], template, 128, train_on_prompt=True, max_source=max_source,
                                        max_target=max_target)
    assert on_prompt[0]["labels"] == on_prompt[0]["input_ids"] == examples[0]["input_ids"]


def test_model_max_length_defaults_to_source_plus_target_length():
    def data_args(*argv: str):
        return parse_arguments(sft.ARGUMENT_TYPES, list(argv))[2]

    assert data_args().model_max_length == 2048
    assert data_args("--max_source_length", "300", "--max_target_length", "200").model_max_length == 500
    assert data_args("--max_source_length", "300").model_max_length == 2048
    assert data_args("--max_source_length", "300", "--max_target_length", "200",
                     "--model_max_length", "1024").model_max_length == 1024
    with pytest.raises(ConfigError, match="max_target_length must be at least 1"):
        data_args("--max_target_length", "0")


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["false", "true"])
def test_a_stage_run_prints_no_library_deprecation_warning(tiny_model, tmp_path, monkeypatch, checkpointing):
    """peft and trl read transformers 5's deprecated is_gradient_checkpointing; with every warning shown
    (PYTHONWARNINGS=default) a stage command still prints none from transformers, peft or trl."""
    import re

    monkeypatch.setenv("PYTHONWARNINGS", "default")
    result = run_medtune("sft", *TINY, "--model_name_or_path", str(tiny_model("glm4")), "--max_steps", "1",
                         "--gradient_checkpointing", checkpointing, "--output_dir", str(tmp_path / "out"),
                         "--eval_strategy", "no", "--save_strategy", "no", "--report_to", "none")
    assert result.returncode == 0, result.stderr[-2000:]
    warned = re.findall(r"/(?:transformers|peft|trl)/\S+: (?:Future|Deprecation)Warning: .*", result.stderr)
    assert warned == []

"""`medtune dpo`: pairs render like sft, over-long pairs are truncated by rule, every method runs, reference
log-probs are cached, bad input stops early, and DPO learns the preference."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from torch import nn
from transformers import AutoTokenizer

from medtune.config import parse_arguments
from medtune.data.loading import load_records
from medtune.data.preference import encode_pairs, fit_to_length
from medtune.models.dropout import FastDropout
from medtune.models.loader import load_chat_template
from medtune.stages import dpo, sft

from .conftest import REPO, run_medtune

PAIRS = REPO / "data" / "reward"


def dpo_args(model: Path, out: Path, *extra: str):
    return parse_arguments(dpo.ARGUMENT_TYPES, [
        "--model_name_or_path", str(model), "--output_dir", str(out), "--max_length", "256",
        "--per_device_train_batch_size", "2", "--max_train_samples", "8", "--logging_steps", "1",
        "--max_steps", "2", "--eval_steps", "2", "--save_steps", "2", "--report_to", "tensorboard", *extra])


def test_three_formats_become_the_same_pair(tmp_path):
    prompt = [{"role": "system", "content": "你是药师。"}, {"role": "user", "content": "孕妇能用多西环素吗？"}]
    records = [
        {"system": "你是药师。", "history": [], "question": "孕妇能用多西环素吗？", "response_chosen": "不能。",
         "response_rejected": "可以。"},
        {"conversations": [{"from": "system", "value": "你是药师。"}, {"from": "human", "value": "孕妇能用多西环素吗？"}],
         "chosen": {"from": "gpt", "value": "不能。"}, "rejected": "可以。"},
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "不能。"}], "rejected": "可以。"},
    ]
    for i, record in enumerate(records):
        (tmp_path / f"{i}.jsonl").write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    pairs, _ = load_records(tmp_path, "preference")
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [(prompt, "不能。", "可以。")] * 3


def test_fit_to_length_keeps_the_prompt_end_and_counts():
    prompt, chosen, rejected = list(range(100)), list(range(100, 160)), list(range(200, 230))
    p, c, r, truncated = fit_to_length(prompt, chosen, rejected, 100)
    assert truncated and len(p) == 50 and p == prompt[-50:]  # half the budget: answers need more than the rest
    assert c == chosen[:50] and r == rejected  # rejected already fits in what remains
    assert max(len(p) + len(c), len(p) + len(r)) <= 100
    assert fit_to_length([1, 2], [3], [4], 10) == ([1, 2], [3], [4], False)
    # the template's leading tokens survive the cut
    p, _, _, _ = fit_to_length([7, 8] + prompt, chosen, rejected, 100, head=[7, 8])
    assert p[:2] == [7, 8] and p[2:] == prompt[-48:]


def test_pairs_render_with_the_inference_prompt_and_learn_to_stop(glm4_dir):
    tokenizer = AutoTokenizer.from_pretrained(glm4_dir)
    template = load_chat_template(str(glm4_dir), tokenizer)
    pairs, _ = load_records(PAIRS, "preference")
    rows, stats = encode_pairs(pairs[:20], template, max_length=4096)
    assert stats.truncated == 0
    for pair, row in zip(pairs[:20], rows):
        assert row["prompt_ids"] == template.prompt_ids(pair.prompt)
        assert row["chosen_ids"][-1] in template.stop_token_ids and row["rejected_ids"][-1] in template.stop_token_ids
    short_rows, short = encode_pairs(pairs[:20], template, max_length=64)
    assert short.pairs == 20 and short.truncated > 0  # truncated, not dropped
    assert template.head_ids == tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"])
    assert all(r["prompt_ids"][:2] == template.head_ids for r in short_rows)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "orpo", "simpo", "kto"])
def test_every_method_trains_and_logs_rewards(glm4_dir, tmp_path, loss_type):
    metrics = dpo.run_dpo(*dpo_args(glm4_dir, tmp_path, "--loss_type", loss_type))
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))
    results = json.loads((tmp_path / "train_results.json").read_text())
    assert "rewards/chosen" in results and "rewards/margins" in results
    if loss_type != "kto":  # KTO judges single answers, so it has no pairwise accuracy
        assert "rewards/accuracies" in results and "eval_rewards/accuracies" in metrics


def test_reference_log_probs_are_cached_across_runs_and_loss_types(glm4_dir, tmp_path):
    cache = tmp_path / "cache"
    dpo.run_dpo(*dpo_args(glm4_dir, tmp_path / "a", "--precompute_ref_log_probs", "true",
                          "--data_cache_dir", str(cache)))
    cached = sorted(p.name for p in cache.rglob("cache-*.arrow"))
    assert cached  # reference log-probs written next to the tokenized pairs
    dpo.run_dpo(*dpo_args(glm4_dir, tmp_path / "b", "--precompute_ref_log_probs", "true", "--loss_type", "ipo",
                          "--data_cache_dir", str(cache)))
    assert sorted(p.name for p in cache.rglob("cache-*.arrow")) == cached  # found, not recomputed


def test_bad_pairs_stop_before_training_and_identical_pairs_are_counted(glm4_dir, tmp_path):
    good = {"system": "", "history": [], "question": "发热怎么办？", "response_chosen": "多饮水，高热就医。",
            "response_rejected": "不用管。"}
    same = dict(good, response_rejected=good["response_chosen"])
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in [good, same, good, good]) + "\n",
                    encoding="utf-8")
    out = tmp_path / "out"
    dpo.run_dpo(*dpo_args(glm4_dir, out, "--train_file_dir", str(data), "--validation_split_percentage", "0"))
    assert json.loads((out / "data_stats.json").read_text())["dropped_identical"] == 1

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good, ensure_ascii=False) + "\n" + json.dumps({"question": "x", "response_chosen": "y"},
                                                                            ensure_ascii=False) + "\n", encoding="utf-8")
    result = run_medtune("dpo", "--model_name_or_path", str(glm4_dir), "--train_file_dir", str(bad), "--output_dir",
                         str(tmp_path / "o2"), "--max_steps", "1")
    assert result.returncode == 2
    assert f"medtune: error: {bad}:2: response_rejected: missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_dpo_learns_the_preference_from_a_tiny_sft_model(glm4_dir, tmp_path):
    conversations = tmp_path / "sft.jsonl"
    lines = (REPO / "data" / "finetune" / "medical_sharegpt_part1.jsonl").read_text(encoding="utf-8").splitlines()
    conversations.write_text("\n".join(lines[:16]) + "\n", encoding="utf-8")
    sft.run_sft(*parse_arguments(sft.ARGUMENT_TYPES, [
        "--model_name_or_path", str(glm4_dir), "--train_file_dir", str(conversations), "--output_dir",
        str(tmp_path / "sft"), "--use_peft", "false", "--learning_rate", "1e-3", "--max_steps", "10",
        "--validation_split_percentage", "0", "--save_strategy", "no", "--report_to", "none"]))
    subset = tmp_path / "pairs.jsonl"
    subset.write_text("\n".join((PAIRS / "medical_preference.jsonl").read_text(encoding="utf-8").splitlines()[:8])
                      + "\n", encoding="utf-8")
    metrics = dpo.run_dpo(*parse_arguments(dpo.ARGUMENT_TYPES, [
        "--model_name_or_path", str(tmp_path / "sft"), "--train_file_dir", str(subset), "--validation_file_dir",
        str(subset), "--output_dir", str(tmp_path / "dpo"), "--learning_rate", "5e-3", "--lr_scheduler_type",
        "constant", "--max_steps", "30", "--per_device_train_batch_size", "4", "--max_length", "512",
        "--save_strategy", "no", "--eval_strategy", "no", "--eval_on_start", "false", "--report_to", "none"]))
    assert metrics["eval_rewards/accuracies"] >= 0.9
    assert metrics["eval_rewards/margins"] > 0


def test_full_fine_tuning_with_precomputed_reference(glm4_dir, tmp_path):
    metrics = dpo.run_dpo(*dpo_args(glm4_dir, tmp_path, "--use_peft", "false", "--precompute_ref_log_probs", "true",
                                    "--data_cache_dir", str(tmp_path / "cache")))
    assert (tmp_path / "model.safetensors").is_file()
    assert "eval_rewards/accuracies" in metrics


def build_dpo_trainer(model_dir: Path, out: Path, pairs: list, *extra: str):
    """The TRL trainer `medtune dpo` would train, without training it; returns (trainer, template, data args)."""
    from medtune.models.loader import load_tokenizer, lora_config
    from medtune.stages.common import load_training_model

    model_args, lora_args, data_args, training_args = dpo_args(model_dir, out, "--report_to", "none",
                                                               "--eval_strategy", "no", "--eval_on_start", "false", *extra)
    tokenizer = load_tokenizer(str(model_dir))
    template = load_chat_template(str(model_dir), tokenizer)
    train_set, _, _ = dpo.prepare_preference_data(training_args, data_args, template, pairs, [])
    model = load_training_model(str(model_dir), model_args, training_args)
    trainer = dpo.build_trainer(training_args, data_args, model, tokenizer, train_set, None,
                                lora_config(lora_args) if lora_args.use_peft else None)
    return trainer, template, data_args


def test_lora_dpo_keeps_one_copy_of_the_weights(glm4_dir, tmp_path):
    pairs, _ = load_records(PAIRS, "preference")
    trainer, _, _ = build_dpo_trainer(glm4_dir, tmp_path, pairs[:4])
    assert trainer.ref_model is None  # the reference is the base with the adapter disabled
    dropouts = [m for m in trainer.model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is FastDropout for m in dropouts)  # the adapter TRL attached drops cheaply
    assert sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) < 0.1 * sum(
        p.numel() for p in trainer.model.parameters())


@pytest.mark.parametrize("loss_type", ["orpo", "simpo"])
def test_orpo_and_simpo_rows_are_the_template_ids_without_an_extra_eos(glm4_dir, tmp_path, loss_type):
    pairs, _ = load_records(PAIRS, "preference")
    trainer, template, data_args = build_dpo_trainer(glm4_dir, tmp_path, pairs[:3], "--loss_type", loss_type)
    expected, _ = encode_pairs(pairs[:3], template, data_args.max_length)
    for row, ids in zip(trainer.train_dataset, expected):
        assert row["chosen_input_ids"] == ids["prompt_ids"] + ids["chosen_ids"]
        assert row["rejected_labels"] == [-100] * len(ids["prompt_ids"]) + ids["rejected_ids"]


def test_kto_trains_on_the_template_reply_ids_without_an_extra_eos(tiny_model, tmp_path):
    qwen = tiny_model("qwen2")
    pairs, _ = load_records(PAIRS, "preference")
    trainer, template, _ = build_dpo_trainer(qwen, tmp_path, pairs[:6], "--loss_type", "kto", "--max_length", "64")
    assert template.tokenizer.eos_token == "<|endoftext|>" and "<|im_end|>" in template.stop_strings
    expected = {}  # (prompt ids, desirable) -> the reply ids the template renders after that prompt
    for pair in pairs[:6]:
        for reply, label in ((pair.chosen, True), (pair.rejected, False)):
            prompt, ids = template.encode_reply(pair.prompt, reply)
            expected[(tuple(prompt), label)] = (prompt, ids)
    truncated = 0
    for row in trainer.train_dataset:
        batch = trainer.data_collator([row])  # what the loss sees
        trained = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
        full_prompt, reply = next(v for (p, label), v in expected.items()
                                  if label == row["label"] and list(p[-len(row["prompt_ids"]) + 2:]) == row["prompt_ids"][2:])
        if len(full_prompt) + len(reply) <= 64:
            assert row["prompt_ids"] == full_prompt and trained == reply  # exactly, ending with <|im_end|>\n
        else:
            truncated += 1
            assert trained == reply[: 64 - len(row["prompt_ids"])]  # cut, with nothing appended
        assert template.tokenizer.eos_token_id not in trained
    assert truncated > 0


def prepared(model_dir: Path, out: Path, pairs: list, *extra: str):
    """(train set, encode calls) the way `medtune dpo` prepares data for the given options."""
    from unittest import mock

    from medtune.models.loader import load_tokenizer
    from medtune.templates.chat import ChatTemplate

    _, _, data_args, training_args = dpo_args(model_dir, out, "--report_to", "none", *extra)
    template = load_chat_template(str(model_dir), load_tokenizer(str(model_dir)))
    with mock.patch.object(ChatTemplate, "encode_reply", autospec=True,
                           side_effect=ChatTemplate.encode_reply) as encode:
        train_set, _, _ = dpo.prepare_preference_data(training_args, data_args, template, pairs, [])
    return train_set, encode.call_count


@pytest.mark.parametrize("loss_type", ["sigmoid", "orpo", "simpo", "kto"])
def test_every_method_encodes_once_then_loads_the_cache(glm4_dir, tmp_path, loss_type):
    pairs, _ = load_records(PAIRS, "preference")
    cache = ("--data_cache_dir", str(tmp_path / "cache"), "--loss_type", loss_type)
    first, calls = prepared(glm4_dir, tmp_path, pairs[:5], *cache)
    assert calls == 10  # chosen and rejected of each pair
    again, calls = prepared(glm4_dir, tmp_path, pairs[:5], *cache)
    assert calls == 0 and again[:] == first[:]  # looked up before any encoding
    _, calls = prepared(glm4_dir, tmp_path, pairs[:5], *cache, "--overwrite_cache", "true")
    assert calls == 10


def test_reference_log_probs_are_recomputed_when_a_pair_changes(glm4_dir, tmp_path):
    from unittest import mock

    from trl import DPOTrainer

    pairs, _ = load_records(PAIRS, "preference")
    options = ("--precompute_ref_log_probs", "true", "--data_cache_dir", str(tmp_path / "cache"))

    def reference_pass(pairs):
        with mock.patch.object(DPOTrainer, "compute_ref_log_probs", autospec=True,
                               side_effect=DPOTrainer.compute_ref_log_probs) as forward:
            trainer, _, _ = build_dpo_trainer(glm4_dir, tmp_path, pairs, *options)
        return trainer.train_dataset["ref_chosen_logps"], forward.call_count

    before, calls = reference_pass(pairs[:4])
    assert calls > 0
    assert reference_pass(pairs[:4]) == (before, 0)  # same data: loaded from the cache
    changed = [pairs[0], pairs[1], replace(pairs[2], chosen=pairs[2].chosen + "请遵医嘱。"), pairs[3]]
    after, calls = reference_pass(changed)
    assert calls > 0  # recomputed, not the stale values
    assert after[:2] == before[:2] and after[3] == before[3] and after[2] != before[2]


def sequence_log_prob(model, prompt: list[int], answer: list[int]):
    """log p(answer | prompt) summed over the answer tokens, from one unpadded forward pass."""
    import torch

    logits = model(input_ids=torch.tensor([prompt + answer])).logits[0].float()
    log_probs = torch.log_softmax(logits[len(prompt) - 1:-1], dim=-1)
    return log_probs.gather(1, torch.tensor(answer)[:, None]).sum()


def test_dpo_loss_matches_a_hand_computation_on_two_pairs(glm4_dir, tmp_path):
    import torch
    import torch.nn.functional as F

    pairs, _ = load_records(PAIRS, "preference")
    trainer, _, _ = build_dpo_trainer(glm4_dir, tmp_path, pairs[:2], "--beta", "0.5")
    model = trainer.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():  # a policy that differs from the reference (the base with the adapter disabled)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    rows = [trainer.train_dataset[i] for i in range(2)]
    assert len(rows[0]["chosen_ids"]) != len(rows[1]["chosen_ids"])  # the batch is padded
    with torch.no_grad():
        loss = trainer.compute_loss(model, trainer.data_collator(rows))
        expected = []
        for row in rows:
            policy = [sequence_log_prob(model, row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids")]
            with model.disable_adapter():
                reference = [sequence_log_prob(model, row["prompt_ids"], row[k]) for k in ("chosen_ids", "rejected_ids")]
            margin = (policy[0] - reference[0]) - (policy[1] - reference[1])
            assert abs(margin) > 0.1  # the two models really differ
            expected.append(-F.logsigmoid(0.5 * margin))
    # float32 sums over chunked, padded batches vs one unpadded sequence: agreement to 1e-4 relative
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-4)


def test_one_dpo_step_changes_every_trainable_parameter(glm4_dir, tmp_path):
    import torch

    pairs, _ = load_records(PAIRS, "preference")
    trainer, _, _ = build_dpo_trainer(glm4_dir, tmp_path, pairs[:2], "--use_peft", "false", "--max_steps", "1",
                                      "--learning_rate", "1e-3", "--save_strategy", "no", "--logging_steps", "1")
    before = {name: p.detach().clone() for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert len(before) == sum(1 for _ in trainer.model.parameters())  # full fine-tuning: everything trains
    trainer.train()
    after = dict(trainer.model.named_parameters())
    unchanged = [name for name, value in before.items() if torch.equal(value, after[name].detach())]
    assert unchanged == []


@pytest.mark.parametrize(("option", "loss_type", "attribute", "value"), [
    ("label_smoothing", "robust", "label_smoothing", 0.2),
    ("label_smoothing", "simpo", "label_smoothing", 0.2),
    ("simpo_gamma", "simpo", "simpo_gamma", 0.8),
    ("cpo_alpha", "simpo", "cpo_alpha", 0.3),
    ("desirable_weight", "kto", "desirable_weight", 1.5),
    ("undesirable_weight", "kto", "undesirable_weight", 0.7),
    ("beta", "orpo", "beta", 0.3),
])
def test_preference_options_reach_the_trl_trainer(glm4_dir, tmp_path, option, loss_type, attribute, value):
    pairs, _ = load_records(PAIRS, "preference")
    trainer, _, _ = build_dpo_trainer(glm4_dir, tmp_path, pairs[:2], "--loss_type", loss_type, f"--{option}",
                                      str(value))
    assert getattr(trainer, attribute) == pytest.approx(value)


def test_rpo_alpha_adds_the_chosen_nll_term_and_simpo_has_its_own_beta(glm4_dir, tmp_path):
    pairs, _ = load_records(PAIRS, "preference")
    trainer, _, _ = build_dpo_trainer(glm4_dir, tmp_path, pairs[:2], "--rpo_alpha", "0.5")
    assert (trainer.loss_types, trainer.loss_weights) == (["sigmoid", "sft"], [1.0, 0.5])
    simpo, _, _ = build_dpo_trainer(glm4_dir, tmp_path / "s", pairs[:2], "--loss_type", "simpo")
    assert (simpo.beta, simpo.simpo_gamma, simpo.cpo_alpha) == (2.0, 0.5, 0.0)
    exo, _, _ = build_dpo_trainer(glm4_dir, tmp_path / "e", pairs[:2], "--loss_type", "exo_pair")
    assert exo.label_smoothing == pytest.approx(1e-3)  # TRL refuses exo_pair with 0
    from medtune.errors import ConfigError

    with pytest.raises(ConfigError, match="desirable_weight applies to --loss_type kto, not sigmoid"):
        dpo_args(glm4_dir, tmp_path, "--desirable_weight", "2")


def test_truncation_mode_keeps_the_prompt_start_or_end(glm4_dir):
    tokenizer = AutoTokenizer.from_pretrained(glm4_dir)
    template = load_chat_template(str(glm4_dir), tokenizer)
    pairs, _ = load_records(PAIRS, "preference")
    long_pair = replace(pairs[0], prompt=[{"role": "user", "content": "病史：" + "咳嗽三天，" * 60 + "怎么办？"}])
    full, _ = template.encode_reply(long_pair.prompt, long_pair.chosen)
    (end,), _ = encode_pairs([long_pair], template, 64)
    (start,), _ = encode_pairs([long_pair], template, 64, truncation_mode="keep_start")
    budget = len(end["prompt_ids"])
    assert end["prompt_ids"] == full[:2] + full[-(budget - 2):]  # [gMASK]<sop> + the question
    assert start["prompt_ids"] == full[:len(start["prompt_ids"])] and start["prompt_ids"] != end["prompt_ids"]


@pytest.mark.parametrize("content", ["", "  \n\n", "identical"], ids=["empty", "whitespace", "identical"])
def test_no_usable_pair_is_one_line_naming_the_file(glm4_dir, tmp_path, content):
    from medtune.errors import DataError

    data = tmp_path / "pairs.jsonl"
    read = 3 if content == "identical" else 0
    if content == "identical":
        same = {"question": "发热怎么办？", "response_chosen": "多饮水。", "response_rejected": " 多饮水。"}
        content = "\n".join(json.dumps(same, ensure_ascii=False) for _ in range(read)) + "\n"
    data.write_text(content, encoding="utf-8")
    message = (f"{data}: no usable preference pairs: {read} read, {read} dropped because chosen and rejected are "
               "identical" if read else f"{data}: no records: the file is empty (or holds only whitespace or [])")
    out = tmp_path / "out"
    options = ("--model_name_or_path", str(glm4_dir), "--train_file_dir", str(data), "--output_dir", str(out))
    if content:
        with pytest.raises(DataError) as caught:
            dpo.run_dpo(*parse_arguments(dpo.ARGUMENT_TYPES, list(options)))
        assert str(caught.value) == message
    else:  # as a user sees it
        result = run_medtune("dpo", *options)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1] == f"medtune: error: {message}"
    assert not out.exists()  # nothing written


def test_long_pairs_encode_without_the_tokenizers_length_warning(glm4_dir, monkeypatch):
    """Records longer than the tokenizer's model_max_length are cut by max_length and counted; transformers' own
    'Token indices sequence length is longer' warning would only alarm users."""
    from transformers import tokenization_utils_base

    warnings = []
    monkeypatch.setattr(tokenization_utils_base.logger, "warning", lambda message, *a, **k: warnings.append(message))
    tokenizer = AutoTokenizer.from_pretrained(glm4_dir)
    tokenizer.model_max_length = 16
    template = load_chat_template(str(glm4_dir), tokenizer)
    pairs, _ = load_records(PAIRS, "preference")
    rows, stats = encode_pairs(pairs[:3], template, max_length=32)
    assert stats.truncated == 3 and all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 32 for r in rows)
    assert not [w for w in warnings if "Token indices sequence length" in w]


def test_medicalgpt_length_and_template_names_map_onto_medtunes(glm4_dir, tmp_path):
    """--max_source_length / --max_target_length cap the prompt and each answer, and default max_length to their sum;
    --template_name is --template."""
    model_args, _, data_args, _ = dpo_args(glm4_dir, tmp_path, "--max_source_length", "40", "--max_target_length",
                                           "30", "--template_name", "glm4")
    assert model_args.template == "glm4"
    _, _, explicit, _ = parse_arguments(dpo.ARGUMENT_TYPES, ["--max_source_length", "40", "--max_target_length", "30"])
    assert (explicit.max_length, data_args.max_length) == (70, 256)  # an explicit --max_length still wins
    prompt, chosen, rejected = [7, 8, *range(100)], list(range(100, 160)), list(range(200, 220))
    p, c, r, truncated = fit_to_length(prompt, chosen, rejected, 256, head=[7, 8], max_prompt=40, max_answer=30)
    assert truncated and p == [7, 8, *range(62, 100)] and c == chosen[:30] and r == rejected
    p, _, _, _ = fit_to_length(prompt, chosen, rejected, 256, head=[7, 8], keep="keep_start", max_prompt=40)
    assert p == prompt[:40]
    assert fit_to_length([1, 2], [3], [4], 10, max_prompt=5, max_answer=5) == ([1, 2], [3], [4], False)

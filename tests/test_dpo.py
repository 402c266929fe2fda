"""`medtune dpo`: pairs render like sft, over-long pairs are truncated by rule, every method runs, reference
log-probs are cached, bad input stops early, and DPO learns the preference."""

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from medtune.config import parse_arguments
from medtune.data.loading import load_records
from medtune.data.preference import encode_pairs, fit_to_length
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


def test_string_methods_get_pairs_fitted_by_the_same_rule(glm4_dir):
    from medtune.data.preference import render_pairs

    tokenizer = AutoTokenizer.from_pretrained(glm4_dir)
    template = load_chat_template(str(glm4_dir), tokenizer)
    pairs, _ = load_records(PAIRS, "preference")
    rows, stats = render_pairs(pairs[:10], template, max_length=64)
    assert stats.pairs == 10 and stats.truncated > 0
    for row in rows:
        prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
        for answer in ("chosen", "rejected"):
            assert prompt + len(tokenizer(row[answer], add_special_tokens=False)["input_ids"]) <= 64 + 2


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
                                                               "--eval_strategy", "no", *extra)
    tokenizer = load_tokenizer(str(model_dir))
    template = load_chat_template(str(model_dir), tokenizer)
    model = load_training_model(str(model_dir), model_args, training_args)
    trainer, _ = dpo.build_trainer(training_args, data_args, model, tokenizer, template, pairs, [],
                                   lora_config(lora_args))
    return trainer, template, data_args


def test_lora_dpo_keeps_one_copy_of_the_weights(glm4_dir, tmp_path):
    pairs, _ = load_records(PAIRS, "preference")
    trainer, _, _ = build_dpo_trainer(glm4_dir, tmp_path, pairs[:4])
    assert trainer.ref_model is None  # the reference is the base with the adapter disabled
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

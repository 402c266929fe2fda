"""DPO from packed pair rows ([prompt | chosen | rejected], the prompt computed once) gives TRL's own numbers: the
same per-token log-probs, the same loss for every loss type tested, on glm4 and qwen2, under sdpa and eager; and the
rejected reply never sees the chosen one."""

from pathlib import Path

import pytest
import torch

from medtune.config import parse_arguments
from medtune.data.loading import load_records
from medtune.stages import dpo
from medtune.stages.pair_packing import packed_pair_row, pair_attention_mask
from medtune.stages.pair_packing import without_packed_rows as stock

from .conftest import REPO

PAIRS = REPO / "data" / "reward"


def packed_trainer(model_dir: Path, out: Path, attention: str, *extra: str):
    """The LoRA DPO trainer `medtune dpo` builds on 4 bundled pairs, with a policy that differs from its reference
    (random LoRA B weights), and the first 4 rows."""
    from medtune.models.loader import load_chat_template, load_tokenizer, lora_config
    from medtune.stages.common import load_training_model

    model_args, lora_args, data_args, training_args = parse_arguments(dpo.ARGUMENT_TYPES, [
        "--model_name_or_path", str(model_dir), "--output_dir", str(out), "--max_length", "256",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--eval_strategy", "no",
        "--attn_implementation", attention, "--data_cache_dir", str(out / "cache"), *extra])
    tokenizer = load_tokenizer(str(model_dir))
    template = load_chat_template(str(model_dir), tokenizer)
    pairs, _ = load_records(PAIRS, "preference")
    train_set, _, _ = dpo.prepare_preference_data(training_args, data_args, template, pairs[:4], [])
    model = load_training_model(str(model_dir), model_args, training_args)
    trainer = dpo.build_trainer(training_args, data_args, model, tokenizer, train_set, None, lora_config(lora_args))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)
    return trainer, [train_set[i] for i in range(4)]


def log_probs(trainer, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    with torch.no_grad():
        return trainer.model(**inputs, labels=labels, fused_lm_head=True).log_probs


def logged(trainer, mode="train") -> dict:
    metrics = {key: values[-1] for key, values in trainer._metrics[mode].items()}
    trainer._metrics[mode].clear()
    return metrics


@pytest.mark.parametrize("arch", ["glm4", "qwen2"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_trls_per_token_log_probs(tiny_model, tmp_path, arch, attention):
    trainer, rows = packed_trainer(tiny_model(arch), tmp_path, attention)
    assert trainer.packed_pairs
    batch = trainer.data_collator(rows)
    trainer._packed_forward_ready()
    packed, reference = log_probs(trainer, batch), log_probs(trainer, stock(batch))
    assert packed.shape == reference.shape
    assert (packed != 0).sum() == (batch["completion_mask"][:, 1:] != 0).sum()  # only reply tokens are scored
    torch.testing.assert_close(packed, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["glm4", "qwen2"])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_packed_loss_equals_trls_own_path(tiny_model, tmp_path, arch, loss_type):
    trainer, rows = packed_trainer(tiny_model(arch), tmp_path, "sdpa", "--loss_type", loss_type)
    batch = trainer.data_collator(rows)
    with torch.no_grad():
        packed_loss = trainer.compute_loss(trainer.model, batch)
        packed = logged(trainer)
        stock_loss = trainer.compute_loss(trainer.model, stock(batch))
        expected = logged(trainer)
    assert abs(expected["rewards/margins"]) > 1e-3  # policy and reference really differ
    assert packed_loss.item() == pytest.approx(stock_loss.item(), abs=1e-5)
    for key in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "entropy",
                "mean_token_accuracy", "logits/chosen", "logits/rejected"):
        # sequence log-probs sum hundreds of tokens: float32 resolution there is ~3e-5, hence relative 1e-6
        assert packed[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-5), key


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_rejected_reply_never_sees_the_chosen_one(tiny_model, tmp_path, attention):
    trainer, rows = packed_trainer(tiny_model("qwen2"), tmp_path, attention)
    trainer._packed_forward_ready()
    edited = [dict(row, chosen_ids=[(t + 7) % 500 + 3 for t in row["chosen_ids"]]) for row in rows]
    before, after = (log_probs(trainer, trainer.data_collator(r)) for r in (rows, edited))
    chosen_before, rejected_before = before.chunk(2)
    chosen_after, rejected_after = after.chunk(2)
    assert not torch.allclose(chosen_before, chosen_after)  # the edit reached the chosen replies
    torch.testing.assert_close(rejected_after, rejected_before, atol=1e-6, rtol=0)


def test_packed_row_and_mask_layout():
    ids, positions, segments = packed_pair_row([5, 6, 7], [8, 9], [10])
    assert ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert positions.tolist() == [0, 1, 2, 3, 4, 3]  # the rejected reply continues the prompt
    allowed = pair_attention_mask(segments[None], None)[0, 0]
    assert allowed[5].tolist() == [True, True, True, False, False, True]
    assert allowed[4].tolist() == [True, True, True, True, True, False]
    additive = pair_attention_mask(segments[None], torch.float32)[0, 0]
    assert additive[5, 3] == torch.finfo(torch.float32).min and additive[5, 2] == 0


def test_precomputed_reference_is_the_same_as_in_step(tiny_model, tmp_path):
    """The reference pre-pass (pairs sorted by length, larger batches) stores, for each pair in dataset order, the
    log-probs the in-step reference computes."""
    trainer, rows = packed_trainer(tiny_model("glm4"), tmp_path, "sdpa", "--precompute_ref_log_probs", "true",
                                   "--per_device_train_batch_size", "1")
    dataset = trainer.train_dataset
    assert dataset["prompt_ids"] == [row["prompt_ids"] for row in rows]  # the order is restored
    batch = trainer.data_collator(rows)
    with torch.no_grad(), trainer.model.disable_adapter():
        chosen, rejected = log_probs(trainer, stock(batch)).sum(-1).chunk(2)
    torch.testing.assert_close(torch.tensor(dataset["ref_chosen_logps"]), chosen, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.tensor(dataset["ref_rejected_logps"]), rejected, rtol=1e-6, atol=1e-5)

"""DPO from packed pair rows ([prompt | chosen | rejected], the prompt computed once) gives TRL's own numbers: the
same per-token log-probs, the same loss for every loss type tested, on glm4 and qwen2, under sdpa and eager; and the
rejected reply never sees the chosen one."""

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from medtune.config import parse_arguments
from medtune.data.loading import load_records
from medtune.stages import dpo, pair_packing
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_row_and_mask_layout(dtype):
    ids, positions, segments = packed_pair_row([5, 6, 7], [8, 9], [10])
    assert ids.tolist() == [5, 6, 7, 8, 9, 10]
    assert positions.tolist() == [0, 1, 2, 3, 4, 3]  # the rejected reply continues the prompt
    mask = pair_attention_mask(segments[None], dtype)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == dtype
    allowed = (mask[0, 0] == 0).int().tolist()
    assert set(mask.unique().tolist()) == {0, torch.finfo(dtype).min}
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [1, 1, 1, 1, 0, 0],
                       [1, 1, 1, 1, 1, 0],
                       [1, 1, 1, 0, 0, 1]]  # rejected (row 5) sees the prompt and itself, not chosen (3, 4)


def lora_gradients(trainer, batch) -> tuple[float, dict]:
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    logged(trainer)
    return loss.item(), {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["glm4", "qwen2"])
def test_packed_loss_and_lora_gradients_equal_trls_own_path(tiny_model, tmp_path, arch, monkeypatch):
    """The training step's loss and every LoRA gradient, with the reply tokens sent through the head in several
    slices (the packed path) and by TRL's own two-row forward, which materialises every position's logits."""
    monkeypatch.setattr(pair_packing, "REPLY_SLICE", 7)
    trainer, rows = packed_trainer(tiny_model(arch), tmp_path, "sdpa")
    trainer.model.train()
    batch = trainer.data_collator(rows)
    assert (batch["completion_mask"] != 0).sum() > 4 * 7  # the replies span many slices
    packed_loss, packed = lora_gradients(trainer, batch)
    stock_loss, expected = lora_gradients(trainer, stock(batch))
    assert packed_loss == pytest.approx(stock_loss, abs=1e-5)
    assert packed.keys() == expected.keys() and len(packed) > 0
    for name, gradient in expected.items():
        assert gradient.abs().max() > 0, name
        torch.testing.assert_close(packed[name], gradient, atol=1e-5, rtol=1e-4, msg=name)


class LargestTensorWithLastDim(TorchDispatchMode):
    """Records the most rows of any new tensor (not a view, e.g. a weight's transpose) an operation returns whose
    last dimension is `width`."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.rows = width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        if func.is_view:
            return result
        for tensor in (result if isinstance(result, (tuple, list)) else (result,)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() and tensor.shape[-1] == self.width:
                self.rows = max(self.rows, tensor.numel() // self.width)
        return result


def test_the_layers_keep_one_mask_and_the_head_scores_a_slice_at_a_time(tiny_model, tmp_path, monkeypatch):
    """What DPO's step holds beyond SFT's: the [B, 1, L, L] mask is kept once for the backward (not one float copy
    per layer), and no [tokens, vocab] tensor (logits, softmax, their gradient) has more than REPLY_SLICE rows."""
    monkeypatch.setattr(pair_packing, "REPLY_SLICE", 16)
    trainer, rows = packed_trainer(tiny_model("qwen2"), tmp_path, "sdpa")
    trainer.model.train()
    batch = trainer.data_collator(rows)
    width = batch["packed_input_ids"].shape[1]
    masks = {}

    def keep(tensor):
        if tensor.shape[-2:] == (width, width):
            masks[tensor.untyped_storage().data_ptr()] = tensor.dtype
        return tensor

    vocab = trainer.model.get_output_embeddings().weight.shape[0]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), LargestTensorWithLastDim(vocab) as head:
        trainer.compute_loss(trainer.model, batch).backward()
    logged(trainer)
    layers = trainer.model.config.num_hidden_layers
    assert layers > 1 and list(masks.values()) == [torch.float32]
    assert 0 < head.rows <= 16


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

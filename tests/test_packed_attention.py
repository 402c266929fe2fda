"""Per-conversation attention over packed rows (sdpa/eager, `--varlen_attention`): the same loss and gradients as
transformers' block-diagonal mask, no L x L mask built, the stage switches it on and off, and models it cannot
serve exactly keep the mask."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Qwen2Config, masking_utils
from transformers.masking_utils import find_packed_sequence_indices

from medtune.config import parse_arguments
from medtune.models.packed_attention import (
    VARLEN_NAMES,
    conversation_lengths,
    varlen_attention,
    varlen_attention_for_packing,
    varlen_unsupported_reason,
)
from medtune.stages import common, sft

from .conftest import REPO

# per row: conversation lengths; the last row is one conversation, the others end in a collator's padding tail
ROWS = [[37, 1, 52, 30], [90, 24, 6], [120]]


def packed_batch(vocab: int) -> dict:
    width = max(map(sum, ROWS))
    positions = torch.tensor([[p for length in row + [width - sum(row)] for p in range(length)] for row in ROWS])
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, positions.shape, generator=generator)
    return {"input_ids": input_ids, "position_ids": positions,
            "labels": input_ids.masked_fill(positions == 0, -100)}


def loss_and_gradients(model, batch) -> tuple[float, dict]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["glm4", "qwen2", "llama"])
def test_loss_and_gradients_equal_the_block_diagonal_mask(tiny_model, arch, backend, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch), attn_implementation=backend, dtype=torch.float32)
    model.config.use_cache = False
    batch = packed_batch(model.config.vocab_size)
    masked_loss, masked_grads = loss_and_gradients(model, batch)
    built = []
    for name in ("sdpa_mask", "eager_mask"):
        original = getattr(masking_utils, name)
        monkeypatch.setattr(masking_utils, name, lambda *a, _original=original, **k: built.append(1) or _original(*a, **k))
    with varlen_attention_for_packing(model) as used:
        assert used and model.config._attn_implementation == VARLEN_NAMES[backend]
        loss, grads = loss_and_gradients(model, batch)
    assert model.config._attn_implementation == backend  # restored on leaving
    assert built == []  # no [B, 1, L, L] mask was built
    assert loss == pytest.approx(masked_loss, abs=1e-5)
    assert max((grads[name] - masked_grads[name]).abs().max().item() for name in grads) < 1e-5


def test_a_padding_mask_or_a_cache_goes_to_the_replaced_backend(tiny_model):
    """Batches that are not packed rows (right padding with a 2-D mask, generation with a cache) are computed by
    sdpa itself, mask and all."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), attn_implementation="sdpa", dtype=torch.float32)
    model.eval()
    input_ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0
    with torch.no_grad():
        padded = model(input_ids=input_ids, attention_mask=attention_mask).logits
        generated = model.generate(input_ids[:1], max_new_tokens=4, do_sample=False)
        with varlen_attention_for_packing(model):
            assert torch.equal(model(input_ids=input_ids, attention_mask=attention_mask).logits, padded)
            assert torch.equal(model.generate(input_ids[:1], max_new_tokens=4, do_sample=False), generated)


@pytest.mark.parametrize("positions", [
    [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]],
    [[5, 6, 7, 0, 1, 9], [0, 1, 2, 3, 4, 5]],  # a row may start anywhere; any jump starts a conversation
])
def test_conversations_are_delimited_as_transformers_delimits_them(positions):
    positions = torch.tensor(positions)
    expected = find_packed_sequence_indices(positions)
    runs = [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in expected]
    assert conversation_lengths(positions, 2) == runs
    assert conversation_lengths(positions[:1], 3) == [runs[0]] * 3  # [1, L] position ids broadcast over the batch


def test_missing_position_ids_are_refused_rather_than_leaking(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama"), attn_implementation="sdpa")
    attention_module = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 6, 64)
    k = v = torch.randn(1, 2, 6, 64)
    with pytest.raises(RuntimeError, match="position_ids"):
        varlen_attention("sdpa")(attention_module, q, k, v, None)


TINY_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 128}


@pytest.mark.parametrize("config, attention, reason", [
    (Qwen2Config(**TINY_SHAPE, use_sliding_window=True, sliding_window=16, max_window_layers=0), "sdpa",
     "layer types ['sliding_attention']"),
    (Gemma2Config(**TINY_SHAPE, layer_types=["full_attention"] * 2), "eager", "attention logit softcapping"),
    (Qwen2Config(**TINY_SHAPE), "flex_attention", "attention backend flex_attention"),
])
def test_models_it_cannot_serve_exactly_keep_the_mask(config, attention, reason):
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    assert varlen_unsupported_reason(model).startswith(reason)
    with varlen_attention_for_packing(model) as used:
        assert not used and model.config._attn_implementation == attention


class Started(Exception):
    pass


@pytest.mark.parametrize("flag, expected", [("true", VARLEN_NAMES["sdpa"]), ("false", "sdpa")])
def test_sft_trains_packed_rows_per_conversation_unless_switched_off(tiny_model, tmp_path, monkeypatch, flag,
                                                                     expected):
    seen = []

    def started(trainer, *args, **kwargs):
        seen.append((trainer.model, trainer.model.config._attn_implementation))
        raise Started

    monkeypatch.setattr(common.MedtuneTrainer, "train", started)
    args = parse_arguments(sft.ARGUMENT_TYPES, [
        "--model_name_or_path", str(tiny_model("glm4")), "--output_dir", str(tmp_path / "run"), "--packing", "true",
        "--attn_implementation", "sdpa", "--varlen_attention", flag, "--max_train_samples", "8",
        "--validation_split_percentage", "0", "--data_cache_dir", str(tmp_path / "cache"), "--report_to", "none"])
    with pytest.raises(Started):
        sft.run_sft(*args)
    (model, during), = seen
    assert during == expected
    assert model.config._attn_implementation == "sdpa"  # the stage leaves the model as it found it


@pytest.mark.slow
def test_sft_logs_the_same_losses_and_gradient_norms_either_way(tiny_model, tmp_path, monkeypatch):
    """The stage as users run it (LoRA, label-only head, packed rows): three steps with per-conversation attention
    log the losses and gradient norms of transformers' block-diagonal mask, and the final evaluation its loss."""
    import json

    from medtune.models import packed_attention

    calls = []
    original = packed_attention.per_conversation_attention
    monkeypatch.setattr(packed_attention, "per_conversation_attention",
                        lambda *a, **k: calls.append(1) or original(*a, **k))

    def history(flag: str) -> list[float]:
        out = tmp_path / flag
        sft.run_sft(*parse_arguments(sft.ARGUMENT_TYPES, [
            "--config", str(REPO / "configs" / "sft_tiny.yaml"), "--model_name_or_path", str(tiny_model("glm4")),
            "--attn_implementation", "sdpa", "--output_dir", str(out), "--max_steps", "3", "--save_strategy", "no",
            "--eval_strategy", "no", "--report_to", "none", "--logging_steps", "1", "--varlen_attention", flag]))
        log = json.loads((out / "trainer_state.json").read_text())["log_history"]
        steps = [value for e in log if "loss" in e for value in (e["loss"], e["grad_norm"])]
        return steps + [json.loads((out / "eval_results.json").read_text())["eval_loss"]]

    masked = history("false")
    assert calls == []
    per_conversation = history("true")
    assert len(calls) > 3 * 2  # every layer of the three steps and of the final evaluation
    assert per_conversation == pytest.approx(masked, abs=1e-5)

"""Packed conversations never attend to each other, on every attention backend: a batch of two packed rows, taken
from the Trainer exactly as the sft stage wires it, has its first conversation edited, and every other
conversation's logits must not move.

flash-attention keeps packed sequences apart only for a single-row batch (transformers' `_is_packed_sequence`);
stacked rows would leak inside a row. Without a GPU the real transformers flash-attention path is run with a
reference kernel in place of flash-attn's, so the routing that decides whether conversations leak is still tested.
"""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers import modeling_flash_attention_utils as flash_utils

from medtune.config import parse_arguments
from medtune.stages import common, sft

CAPACITY = 1024
HAS_FLASH_ATTN = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


class FirstBatch(Exception):
    def __init__(self, batch):
        self.batch = batch


@pytest.fixture(scope="module")
def trainer_batch(tiny_model, tmp_path_factory):
    """The first training batch the sft stage's Trainer builds with per_device_train_batch_size 2, and the rows
    (features) the collator was given for it."""
    out = tmp_path_factory.mktemp("leak")
    rows: list[list] = []
    make_collator = sft.sft_collator

    def recording_collator(tokenizer, data_args):
        collate = make_collator(tokenizer, data_args)

        def record(features):
            rows.append([list(f["position_ids"]) for f in features])
            return collate(features)
        return record

    def first_batch(trainer, *args, **kwargs):
        raise FirstBatch(next(iter(trainer.get_train_dataloader())))

    args = parse_arguments(sft.ARGUMENT_TYPES, [
        "--model_name_or_path", str(tiny_model("glm4")), "--output_dir", str(out / "run"), "--packing", "true",
        "--model_max_length", str(CAPACITY), "--per_device_train_batch_size", "2", "--validation_split_percentage", "0",
        "--max_train_samples", "60", "--data_cache_dir", str(out / "cache"), "--report_to", "none"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sft, "sft_collator", recording_collator)
        patch.setattr(common.MedtuneTrainer, "train", first_batch)
        with pytest.raises(FirstBatch) as caught:
            sft.run_sft(*args)
    return caught.value.batch, rows[0]


def reference_attention(q, k, v, causal, scale):
    """[seq, heads, dim] attention of one sequence (grouped-query heads repeated), by torch's sdpa."""
    q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    repeat = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).transpose(0, 1)


def reference_flash(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func's contract: [batch, seq, heads, dim], each batch row one sequence."""
    return torch.stack([reference_attention(q[b], k[b], v[b], causal, softmax_scale) for b in range(q.shape[0])])


def reference_flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract: [total, heads, dim], sequences delimited by cu_seqlens."""
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        out[start:end] = reference_attention(q[start:end], k[start:end], v[start:end], causal, softmax_scale)
    return out


def load_model(folder, backend: str, monkeypatch):
    if backend == "flash_attention_2 (reference kernel)":
        monkeypatch.setattr(flash_utils, "_loaded_implementation", None)
        monkeypatch.setattr(flash_utils, "_lazy_imports", lambda *args, **kwargs: (
            reference_flash, reference_flash_varlen, None, flash_utils._pad_input, flash_utils._unpad_input))
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=torch.float32)
        model.config._attn_implementation = "flash_attention_2"  # routed through transformers' flash path
        return model
    if backend == "flash_attention_2":
        return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=backend, dtype=torch.bfloat16).cuda()
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=backend, dtype=torch.float32)


@pytest.mark.parametrize("backend", [
    "eager", "sdpa", "flash_attention_2 (reference kernel)",
    pytest.param("flash_attention_2", marks=pytest.mark.skipif(not HAS_FLASH_ATTN, reason="needs CUDA and flash-attn")),
])
def test_editing_one_packed_conversation_leaves_every_other_conversation_unchanged(tiny_model, trainer_batch,
                                                                                  backend, monkeypatch):
    batch, rows = trainer_batch
    assert len(rows) == 2  # two packed rows in this batch ...
    assert sum(position == 0 for position in rows[0]) >= 2  # ... the first holding several conversations
    positions = batch["position_ids"]
    conversation = (positions == 0).cumsum(-1) - 1  # 0 for the first conversation, 1 for the next, ...
    first = conversation == 0
    edited = batch["input_ids"].clone()
    edited[first] = (edited[first] + 17) % 1000  # other ordinary tokens

    model = load_model(tiny_model("glm4"), backend, monkeypatch)
    model.config.use_cache = False  # as in training: with a cache, transformers ignores packed position ids
    model.eval()
    device = model.device
    with torch.no_grad():
        before, after = (model(input_ids=ids.to(device), position_ids=positions.to(device)).logits.float()
                         for ids in (batch["input_ids"], edited))
    others = ~first.to(device)
    assert (after[first.to(device)] - before[first.to(device)]).abs().max() > 1e-2  # the edit is seen ...
    tolerance = 1e-5 if model.dtype == torch.float32 else 1e-2
    assert (after[others] - before[others]).abs().max() <= tolerance  # ... by its own conversation only

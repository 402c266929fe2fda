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
from medtune.models.packed_attention import VARLEN_NAMES, register_varlen_attention
from medtune.stages import common, sft

CAPACITY = 1024
HAS_FLASH_ATTN = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


class FirstBatch(Exception):
    def __init__(self, batch):
        self.batch = batch


@pytest.fixture(scope="module")
def trainer_rows(tiny_model, tmp_path_factory):
    """The packed rows (features) of the first training batch the sft stage's Trainer builds with
    per_device_train_batch_size 2, and a function collating them as the stage does for an attention backend."""
    out = tmp_path_factory.mktemp("leak")
    seen: list = []
    make_collator = sft.sft_collator

    def recording_collator(tokenizer, data_args, attn_implementation=None):
        collate = make_collator(tokenizer, data_args, attn_implementation)

        def record(features):
            seen.append(list(features))
            return collate(features)
        record.rebuild = lambda backend: make_collator(tokenizer, data_args, backend)
        seen.append(record)
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
        with pytest.raises(FirstBatch):
            sft.run_sft(*args)
    collator, features = seen[0], seen[1]
    return features, collator.rebuild


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
    if backend.endswith("(varlen)"):  # what `medtune sft` trains packed rows with under sdpa/eager by default
        base = backend.split(" ")[0]
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=base, dtype=torch.float32)
        register_varlen_attention()
        model.set_attn_implementation(VARLEN_NAMES[base])
        return model
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation=backend, dtype=torch.float32)


def logits_moved_outside_the_edit(model, batch):
    """(largest change of the edited conversation's logits, largest change of every other token's logits) when
    the first conversation of the batch has its tokens replaced."""
    positions = batch["position_ids"]
    first = ((positions == 0).cumsum(-1) - 1) == 0  # the first conversation of the first row
    edited = batch["input_ids"].clone()
    edited[first] = (edited[first] + 17) % 1000  # other ordinary tokens
    model.config.use_cache = False  # as in training: with a cache, transformers ignores packed position ids
    model.eval()
    device, first = model.device, first.to(model.device)
    with torch.no_grad():
        before, after = (model(input_ids=ids.to(device), position_ids=positions.to(device)).logits.float()
                         for ids in (batch["input_ids"], edited))
    change = (after - before).abs()
    return change[first].max().item(), change[~first].max().item()


@pytest.mark.parametrize("backend", [
    "eager", "sdpa", "eager (varlen)", "sdpa (varlen)", "flash_attention_2 (reference kernel)",
    pytest.param("flash_attention_2", marks=pytest.mark.skipif(not HAS_FLASH_ATTN, reason="needs CUDA and flash-attn")),
])
def test_editing_one_packed_conversation_leaves_every_other_conversation_unchanged(tiny_model, trainer_rows,
                                                                                  backend, monkeypatch):
    features, collator_for = trainer_rows
    assert len(features) == 2  # two packed rows in this batch ...
    assert sum(position == 0 for position in features[0]["position_ids"]) >= 2  # ... the first holding several
    batch = collator_for(backend.split(" ")[0])(features)
    assert batch["input_ids"].shape[0] == (1 if "flash" in backend else 2)  # joined for flash, stacked otherwise
    model = load_model(tiny_model("glm4"), backend, monkeypatch)
    edited, others = logits_moved_outside_the_edit(model, batch)
    assert edited > 1e-2  # the edit is seen ...
    assert others <= (1e-5 if model.dtype == torch.float32 else 1e-2)  # ... by its own conversation only


def test_stacked_rows_would_leak_under_flash_attention(tiny_model, trainer_rows, monkeypatch):
    """Why flash-attention gets one joined row: with two stacked rows its path is plain causal inside each row."""
    features, collator_for = trainer_rows
    stacked = collator_for("sdpa")(features)
    model = load_model(tiny_model("glm4"), "flash_attention_2 (reference kernel)", monkeypatch)
    assert logits_moved_outside_the_edit(model, stacked)[1] > 1e-3

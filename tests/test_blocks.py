"""Grouping into blocks loses and duplicates no token; the collator accepts whatever datasets hand it."""

import numpy as np
import pytest
import torch

from medtune.data.blocks import IGNORE_INDEX, group_into_blocks, iter_blocks, tokenize_texts
from medtune.data.collators import PaddingCollator
from medtune.data.loading import load_records
from medtune.models.loader import load_tokenizer

from .conftest import REPO


@pytest.fixture(scope="module")
def corpus_ids(glm4_dir):
    tokenizer = load_tokenizer(str(glm4_dir))
    documents, _ = load_records(REPO / "data" / "pretrain", "text")
    ids = list(tokenize_texts((d.text for d in documents), tokenizer, batch_size=16))
    assert len(ids) == len(documents) and all(doc[-1] == tokenizer.eos_token_id for doc in ids)
    return ids, tokenizer.pad_token_id


@pytest.mark.parametrize("block_size", [7, 128, 1000])
def test_pad_mode_keeps_every_token_exactly_once(corpus_ids, block_size):
    ids, pad = corpus_ids
    blocks, stats = group_into_blocks(ids, block_size, "pad", pad)
    stream = [token for doc in ids for token in doc]
    regrouped = [t for b in blocks for t, m in zip(b["input_ids"], b["attention_mask"]) if m == 1]
    assert regrouped == stream
    assert all(len(b["input_ids"]) == block_size for b in blocks)
    assert stats.tokens == len(stream) and stats.dropped_tokens == 0
    assert stats.padded_tokens == (-len(stream)) % block_size
    # padding is never a training target
    for block in blocks:
        assert [lab for lab, m in zip(block["labels"], block["attention_mask"]) if m == 0] == [IGNORE_INDEX] * (
            block_size - sum(block["attention_mask"]))


@pytest.mark.parametrize("block_size", [7, 128])
def test_drop_mode_drops_only_the_counted_remainder(corpus_ids, block_size):
    ids, pad = corpus_ids
    blocks, stats = group_into_blocks(ids, block_size, "drop", pad)
    stream = [token for doc in ids for token in doc]
    regrouped = [t for b in blocks for t in b["input_ids"]]
    assert regrouped == stream[: len(regrouped)]
    assert stats.dropped_tokens == len(stream) - len(regrouped) == len(stream) % block_size
    assert all(sum(b["attention_mask"]) == block_size for b in blocks)


def test_remainder_is_carried_across_document_batches():
    # A per-batch group_texts would lose the tail of every batch; ours only ever touches the final block.
    documents = [[1, 2, 3]] * 5
    blocks = list(iter_blocks(iter(documents), 4, "drop", 0))
    assert [b["input_ids"] for b in blocks] == [[1, 2, 3, 1], [2, 3, 1, 2], [3, 1, 2, 3]]


def test_collator_accepts_lists_arrays_tensors_and_ragged_features():
    collate = PaddingCollator(pad_token_id=0)
    batch = collate([
        {"input_ids": [5, 6, 7]},
        {"input_ids": np.array([8, 9], dtype=np.int32), "attention_mask": (1, 1), "extra": "ignored"},
        {"input_ids": torch.tensor([1, 2, 3], dtype=torch.int16), "labels": torch.tensor([1, 2, -100])},
    ])
    assert batch["input_ids"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0], [1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    assert batch["labels"].tolist() == [[5, 6, 7], [8, 9, -100], [1, 2, -100]]

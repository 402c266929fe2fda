"""Continued-pretraining blocks: documents -> token ids (+EOS) -> one stream -> fixed-size blocks.

Grouping runs over the whole stream, carrying the partial block from one batch of documents into the next, so
no token is lost between batches (a per-batch `group_texts` drops a remainder in every batch). Only the final
partial block is special: `remainder="pad"` keeps it padded (padding is masked from the loss and attention),
`"drop"` discards it; both are counted in `BlockStats`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

IGNORE_INDEX = -100


@dataclass
class BlockStats:
    documents: int = 0
    tokens: int = 0  # real tokens read, EOS separators included
    blocks: int = 0
    padded_tokens: int = 0  # padding added to the final block (remainder="pad")
    dropped_tokens: int = 0  # real tokens discarded with the final block (remainder="drop")

    def to_dict(self) -> dict:
        data = asdict(self)
        computed = self.blocks and self.tokens - self.dropped_tokens + self.padded_tokens
        data["real_token_fraction"] = round((self.tokens - self.dropped_tokens) / computed, 6) if computed else 0.0
        return data


def make_block(ids: list[int], block_size: int, pad_token_id: int) -> dict[str, list[int]]:
    real = len(ids)
    pad = block_size - real
    return {
        "input_ids": ids + [pad_token_id] * pad,
        "attention_mask": [1] * real + [0] * pad,
        "labels": ids + [IGNORE_INDEX] * pad,
    }


def iter_blocks(token_lists: Iterable[list[int]], block_size: int, remainder: str, pad_token_id: int,
                stats: BlockStats | None = None) -> Iterator[dict[str, list[int]]]:
    """Yield blocks from a stream of tokenized documents, updating `stats` as it goes."""
    stats = stats if stats is not None else BlockStats()
    buffer: list[int] = []
    for ids in token_lists:
        stats.documents += 1
        stats.tokens += len(ids)
        buffer.extend(ids)
        if len(buffer) >= block_size:
            full = len(buffer) // block_size * block_size
            for start in range(0, full, block_size):
                stats.blocks += 1
                yield make_block(buffer[start:start + block_size], block_size, pad_token_id)
            buffer = buffer[full:]
    if buffer:
        if remainder == "pad":
            stats.blocks += 1
            stats.padded_tokens += block_size - len(buffer)
            yield make_block(buffer, block_size, pad_token_id)
        else:
            stats.dropped_tokens += len(buffer)


def group_into_blocks(token_lists: Iterable[list[int]], block_size: int, remainder: str,
                      pad_token_id: int) -> tuple[list[dict[str, list[int]]], BlockStats]:
    stats = BlockStats()
    blocks = list(iter_blocks(token_lists, block_size, remainder, pad_token_id, stats))
    return blocks, stats


def tokenize_texts(texts: Iterable[str], tokenizer, batch_size: int = 1000) -> Iterator[list[int]]:
    """Token ids of each text followed by EOS, so the model sees where one document ends and the next begins.

    No padding and no truncation: documents of any length are cut only by the grouping step. No special prefix
    either (GLM's [gMASK]<sop> belongs to chat prompts, not to running text).
    """
    eos = tokenizer.eos_token_id
    batch: list[str] = []

    def flush():
        encoded = tokenizer(batch, add_special_tokens=False, padding=False, truncation=False, verbose=False)
        for ids in encoded["input_ids"]:
            yield list(ids) + ([eos] if eos is not None else [])

    for text in texts:
        batch.append(text)
        if len(batch) >= batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()

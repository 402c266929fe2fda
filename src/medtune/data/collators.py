"""Collators that turn a list of features into a batch of tensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from medtune.data.blocks import IGNORE_INDEX


def _as_ids(value: Any) -> torch.Tensor:
    """Lists, tuples, numpy arrays, tensors (any integer dtype), even a bare int: all become a 1-D long tensor."""
    tensor = torch.as_tensor(value)
    return tensor.reshape(-1).long()


class PaddingCollator:
    """Batch causal-LM features (pretraining blocks, unpacked conversations) with right padding.

    Tolerant of what datasets and users hand in: features may hold lists, numpy arrays or tensors, may lack
    `attention_mask` or `labels` (derived from `input_ids`), and may differ in length (right-padded, with
    padding masked from the loss). Unknown keys are ignored.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = [_as_ids(f["input_ids"]) for f in features]
        masks = [_as_ids(f["attention_mask"]) if f.get("attention_mask") is not None else torch.ones_like(ids)
                 for f, ids in zip(features, input_ids)]
        labels = []
        for f, ids, mask in zip(features, input_ids, masks):
            label = _as_ids(f["labels"]) if f.get("labels") is not None else ids.clone()
            labels.append(label.masked_fill(mask == 0, IGNORE_INDEX))
        width = max(len(ids) for ids in input_ids)

        def pad(rows: list[torch.Tensor], value: int) -> torch.Tensor:
            return torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=value) for r in rows])

        return {
            "input_ids": pad(input_ids, self.pad_token_id),
            "attention_mask": pad(masks, 0),
            "labels": pad(labels, IGNORE_INDEX),
        }


def packs_into_one_row(attn_implementation: str | None) -> bool:
    """Whether packed rows must be joined into one row for this attention backend.

    flash-attention kernels (flash_attention_2/3, hub kernels) read restarting position ids as varlen sequence
    boundaries only for a batch of ONE row (transformers' `_is_packed_sequence`): stacked [B, L] rows would be plain
    causal over every conversation in a row. sdpa and eager build a block-diagonal mask from the position ids of
    each row, so they keep stacked rows, whose attention cost grows with each row (L^2 per row) rather than with
    the whole batch ((B*L)^2 for one joined row).
    """
    return "flash" in (attn_implementation or "")


class PackedCollator:
    """Batch packed rows (several conversations per row, `position_ids` restarting at each one), without an
    attention mask, so that transformers keeps the conversations apart on every backend.

    `one_row=False` (sdpa, eager): rows are stacked to [B, L]; a row shorter than the longest is padded with a
    pseudo-sequence of its own (positions restart at 0, labels -100) that nothing real attends to.
    `one_row=True` (flash-attention, see `packs_into_one_row`): rows are joined into [1, total tokens], no padding.
    Either way nothing predicts a conversation's first token from the previous conversation, and the loss is the
    same token-weighted mean.
    """

    def __init__(self, pad_token_id: int, one_row: bool = False):
        self.pad_token_id = pad_token_id
        self.one_row = one_row

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [(_as_ids(f["input_ids"]), _as_ids(f["labels"]), _as_ids(f["position_ids"])) for f in features]
        if self.one_row:
            input_ids, labels, positions = (torch.cat(column).unsqueeze(0) for column in zip(*rows))
        else:
            width = max(len(ids) for ids, _, _ in rows)
            padded = [(torch.cat([ids, ids.new_full((width - len(ids),), self.pad_token_id)]),
                       torch.cat([label, label.new_full((width - len(ids),), IGNORE_INDEX)]),
                       torch.cat([position, torch.arange(width - len(ids), dtype=position.dtype)]))
                      for ids, label, position in rows]
            input_ids, labels, positions = (torch.stack(column) for column in zip(*padded))
        labels = labels.masked_fill(positions == 0, IGNORE_INDEX)
        return {"input_ids": input_ids, "labels": labels, "position_ids": positions}

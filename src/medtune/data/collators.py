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


class PackedCollator:
    """Batch packed rows as ONE flattened row [1, total tokens], `position_ids` restarting at each conversation.

    Every attention backend then keeps conversations apart with no attention mask: sdpa and eager derive a
    block-diagonal causal mask from the position ids, and flash-attention turns them into varlen boundaries -- but
    only for a batch of one row (transformers' `_is_packed_sequence`), which is why the rows are flattened rather
    than stacked: stacked [B, L] rows under flash-attention would be plain causal over every conversation in a row.
    Flattening also needs no padding, and the loss is the same token-weighted mean as for stacked rows.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id  # unused (a flattened batch needs no padding), kept for a uniform API

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        def flattened(key: str) -> torch.Tensor:
            return torch.cat([_as_ids(f[key]) for f in features]).unsqueeze(0)

        positions = flattened("position_ids")
        # Nothing predicts a conversation's first token (it would be predicted from the previous conversation).
        labels = flattened("labels").masked_fill(positions == 0, IGNORE_INDEX)
        return {"input_ids": flattened("input_ids"), "labels": labels, "position_ids": positions}

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
    """Batch packed rows: several conversations per row, `position_ids` restarting at each one.

    No attention mask is passed: transformers then derives a block-diagonal causal mask from the position ids
    (flash-attention uses them as varlen boundaries), so no token attends across conversations. Rows shorter than
    the batch's longest are padded with a pseudo-sequence of their own (positions restart at 0, labels -100), which
    nothing real attends to.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [(_as_ids(f["input_ids"]), _as_ids(f["labels"]), _as_ids(f["position_ids"])) for f in features]
        width = max(len(ids) for ids, _, _ in rows)
        input_ids, labels, positions = [], [], []
        for ids, label, position in rows:
            pad = width - len(ids)
            input_ids.append(torch.cat([ids, ids.new_full((pad,), self.pad_token_id)]))
            labels.append(torch.cat([label, label.new_full((pad,), IGNORE_INDEX)]))
            positions.append(torch.cat([position, torch.arange(pad, dtype=position.dtype)]))
        return {"input_ids": torch.stack(input_ids), "labels": torch.stack(labels),
                "position_ids": torch.stack(positions)}

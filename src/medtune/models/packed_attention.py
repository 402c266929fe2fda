"""Attention over packed rows that costs each conversation's length squared, not the row's, on sdpa and eager.

A packed row holds several conversations whose position ids restart at 0. Under sdpa/eager transformers keeps them
apart with a [B, 1, L, L] block-diagonal mask built from those position ids, so every layer pays L^2 per row
however short the conversations are. The attention registered here instead runs torch's
`scaled_dot_product_attention(is_causal=True)` on each conversation's slice of the row (sum of l_i^2), the same
computation without the off-diagonal blocks. Conversations are the runs of consecutive position ids, exactly as
transformers' `find_packed_sequence_indices` delimits them, so the result equals the masked path up to float
rounding.

Like transformers' own flash-attention packed path, it reads the boundaries from the `position_ids` the decoder
layers hand to the attention function. Its mask function builds no mask when there is no 2-D attention mask and no
cache (the training forward); any other call (padding mask, a cache, one query token) goes to the backend it
replaces (sdpa or eager), mask and all.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import torch

logger = logging.getLogger(__name__)

# backend replaced -> the name registered for it (no "flash": packed rows then stay stacked, see packs_into_one_row)
VARLEN_NAMES = {"sdpa": "medtune_varlen_sdpa", "eager": "medtune_varlen_eager"}
# keyword arguments that change the attention pattern or scores; a per-conversation causal sdpa cannot honour them
UNSUPPORTED_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias")


def conversation_lengths(position_ids: torch.Tensor, rows: int) -> list[list[int]]:
    """Per row, the lengths of its runs of consecutive position ids: a conversation starts at the row's first token
    and wherever the position does not grow by one (transformers' packed-sequence rule)."""
    position_ids = position_ids.expand(rows, -1)
    width = position_ids.shape[1]
    restarts = torch.ones_like(position_ids, dtype=torch.bool)
    restarts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    starts: list[list[int]] = [[] for _ in range(rows)]
    for row, start in restarts.nonzero().tolist():
        starts[row].append(start)
    return [[end - start for start, end in zip(row, row[1:] + [width])] for row in starts]


def per_conversation_attention(query, key, value, lengths: list[list[int]], dropout: float,
                               scaling: float | None) -> torch.Tensor:
    """Causal attention within each conversation of [B, heads, L, dim] query/key/value (`lengths` per row;
    grouped-query heads shared by sdpa itself); returns [B, L, heads, dim] like transformers' attention functions.

    The rows are cut with unbind/split rather than indexing, so the backward pass joins the gradients with one
    stack/cat per tensor instead of adding a full-size zero-padded gradient per conversation.
    """
    grouped = query.shape[1] != key.shape[1]
    pieces = []
    for q_row, k_row, v_row, row_lengths in zip(query.unbind(0), key.unbind(0), value.unbind(0), lengths):
        for q, k, v in zip(q_row.split(row_lengths, 1), k_row.split(row_lengths, 1), v_row.split(row_lengths, 1)):
            out = torch.nn.functional.scaled_dot_product_attention(
                q[None], k[None], v[None], dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=grouped)
            pieces.append(out[0].transpose(0, 1))
    return torch.cat(pieces).view(query.shape[0], query.shape[2], query.shape[1], value.shape[-1])


def replaced_forward(base: str, module):
    """The attention function of the backend this one stands in for."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if base == "sdpa":
        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward  # each model file defines its own


def varlen_attention(base: str):
    def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs):
        length = query.shape[2]
        if attention_mask is not None or length == 1 or key.shape[2] != length:
            return replaced_forward(base, module)(module, query, key, value, attention_mask, dropout=dropout,
                                                  scaling=scaling, **kwargs)
        # The mask function built no mask, so nothing else would keep conversations apart: refuse rather than leak.
        position_ids = kwargs.get("position_ids")
        if position_ids is None or position_ids.dim() != 2:
            raise RuntimeError(f"{type(module).__name__} does not pass 2-D position_ids to its attention function; "
                               "run with --varlen_attention false")
        unsupported = [name for name in UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
        if unsupported:
            raise RuntimeError(f"{type(module).__name__} attention uses {', '.join(unsupported)}; "
                               "run with --varlen_attention false")
        lengths = conversation_lengths(position_ids, query.shape[0])
        return per_conversation_attention(query, key, value, lengths, dropout, scaling), None

    return attention


def varlen_mask(base: str):
    def mask(*args, attention_mask=None, q_offset=0, kv_offset=0, **kwargs):
        from transformers.masking_utils import eager_mask, sdpa_mask

        q_length, kv_length = kwargs.get("q_length"), kwargs.get("kv_length")
        if attention_mask is None and q_offset == 0 and kv_offset == 0 and q_length == kv_length:
            return None  # causal within each conversation, done by the attention function from the position ids
        return (sdpa_mask if base == "sdpa" else eager_mask)(*args, attention_mask=attention_mask,
                                                            q_offset=q_offset, kv_offset=kv_offset, **kwargs)

    return mask


def register_varlen_attention() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    for base, name in VARLEN_NAMES.items():
        AttentionInterface.register(name, varlen_attention(base))
        AttentionMaskInterface.register(name, varlen_mask(base))


def varlen_unsupported_reason(model) -> str | None:
    """Why per-conversation attention would not compute what the model's own attention does (None: it would)."""
    config = model.config
    text = config.get_text_config()
    layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
    checks = [
        (config._attn_implementation not in VARLEN_NAMES,
         f"attention backend {config._attn_implementation} (flash-attention has its own varlen kernels)"),
        (text is not config, "a multimodal model (its masks mix modalities)"),
        (getattr(text, "attn_logit_softcapping", None) is not None, "attention logit softcapping"),
        (layer_types != {"full_attention"}, f"layer types {sorted(layer_types)}"),
        (getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True),
         "sliding-window attention"),
        (getattr(text, "attention_chunk_size", None) is not None, "chunked attention"),
        (getattr(text, "alibi", False), "ALiBi position bias"),
        (not getattr(text, "is_causal", True), "bidirectional attention"),
        (any(hasattr(module, "sinks") for module in model.modules()), "attention sinks"),
        (not getattr(model, "_supports_sdpa", False), "the model does not support sdpa"),
        (not model._can_set_attn_implementation(), "the model does not dispatch through transformers' "
                                                   "AttentionInterface"),
    ]
    return next((reason for failed, reason in checks if failed), None)


@contextlib.contextmanager
def varlen_attention_for_packing(model, enabled: bool = True):
    """While inside, packed rows are attended per conversation (see the module docstring), when `enabled` and the
    model allows it (otherwise transformers' block-diagonal mask, with the reason logged). Yields whether it is on."""
    from medtune.stages.logprobs import language_model

    target = language_model(model)
    reason = "--varlen_attention false" if not enabled else varlen_unsupported_reason(target)
    if reason:
        logger.info("packed rows use transformers' block-diagonal mask: %s", reason)
        yield False
        return
    original = target.config._attn_implementation
    register_varlen_attention()
    target.set_attn_implementation(VARLEN_NAMES[original])
    logger.info("packed rows: attention per conversation (%s)", VARLEN_NAMES[original])
    try:
        yield True
    finally:
        target.set_attn_implementation(original)

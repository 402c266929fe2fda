"""DPO with each pair's prompt computed once: one row [prompt | chosen | rejected] per pair.

TRL's DPOTrainer runs [prompt | chosen] and [prompt | rejected] as two rows (the prompt twice, for the policy and
again for the reference), and on CPU its fused head scores every position, prompt included. Here:

- the collator adds, next to TRL's own batch, one packed row per pair whose rejected reply restarts its position ids
  after the prompt, with a segment id per token (prompt, chosen, rejected, padding);
- the model's forward, given that row, builds a 4-D mask from the segments (causal, and rejected tokens never see
  chosen ones), runs the layers once, and sends only the hidden states that predict reply tokens through the LM head
  (`medtune.stages.logprobs.head_log_probs`), REPLY_SLICE of them at a time;
- the per-token log-probs are scattered back into TRL's [chosen rows; rejected rows] layout, so TRL's
  `_compute_loss` (every loss type, its metrics, the reference pass with the adapter disabled, precomputed reference
  log-probs) runs unchanged on them. TRL's losses stay the definition; only how the log-probs are obtained changes.

A reply's first token is predicted by the prompt's last hidden state, which both replies share.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from typing import Any

import torch

from medtune.stages.logprobs import backbone_hidden_states, has_plain_head, head_log_probs, language_model

PROMPT, CHOSEN, REJECTED, PADDING = 0, 1, 2, 3
PACKED_KEYS = ("packed_input_ids", "packed_position_ids", "packed_segments", "packed_hidden_index")
# Reply tokens per call of the LM head. Each call's [tokens, vocab] logits and softmax (and their recomputation in the
# backward) are transient, but they come on top of every layer's saved activations: at 1,024 tokens they were DPO's
# largest term above SFT in the benchmark (about 50 MB of peak RSS on its small vocabulary, and more through the
# allocator keeping freed blocks of that size). At 128 they are a few MB, and the measured speed is the same.
REPLY_SLICE = 128


def packed_pair_row(prompt: list[int], chosen: list[int], rejected: list[int]):
    """(ids, position ids, segment ids) of the row [prompt | chosen | rejected]; both replies continue the prompt's
    positions."""
    p, c, r = len(prompt), len(chosen), len(rejected)
    ids = torch.tensor(list(prompt) + list(chosen) + list(rejected), dtype=torch.long)
    positions = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
    segments = torch.tensor([PROMPT] * p + [CHOSEN] * c + [REJECTED] * r, dtype=torch.long)
    return ids, positions, segments


def pair_attention_mask(segments: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, L, L] additive mask for packed pair rows (0 where a query may attend, the dtype's minimum elsewhere):
    causal, except that rejected tokens do not see chosen ones. Every row keeps its diagonal, so no query is left
    with nothing to attend to (padding included).

    Additive for sdpa too: given a boolean mask, torch's sdpa converts it to a float one in every layer and keeps each
    copy for the backward (one [B, 1, L, L] float tensor per layer, ~13 MB each for 4 rows of 900 tokens); a float
    mask is used as it is, one tensor shared by all layers. The scores are the same: a masked score's weight is
    exactly 0 either way."""
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    crossing = (segments[:, :, None] == REJECTED) & (segments[:, None, :] == CHOSEN)
    allowed = (causal & ~crossing)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=segments.device).masked_fill(~allowed,
                                                                                       torch.finfo(dtype).min)


def reply_hidden_index(prompt_len: int, chosen_len: int, rejected_len: int, row: int, width: int, trl_width: int):
    """For TRL's chosen and rejected rows of this pair: the flat index (row * width + column) of the packed hidden
    state that predicts each reply token, at TRL's shifted position (log_probs[:, t - 1] scores token t); 0 where
    TRL has no reply token."""
    chosen_index = torch.zeros(trl_width - 1, dtype=torch.long)
    rejected_index = torch.zeros(trl_width - 1, dtype=torch.long)
    p, c, r = prompt_len, chosen_len, rejected_len
    base = row * width
    chosen_index[p - 1: p - 1 + c] = base + torch.arange(p - 1, p - 1 + c)
    # The rejected reply starts after the chosen one in the packed row, but its first token is predicted by the
    # prompt's last state.
    if r:
        rejected_index[p - 1] = base + p - 1
        rejected_index[p: p - 1 + r] = base + torch.arange(p + c, p + c + r - 1)
    return chosen_index, rejected_index


@dataclass
class PackedPairCollator:
    """TRL's preference batch (`stock`, e.g. DataCollatorForPreference) plus the packed rows of `PACKED_KEYS`.

    TRL's own keys stay: TRL reads `completion_mask` and `attention_mask` for its losses and counts, and the labels it
    derives from `input_ids` say which positions are scored."""

    stock: Any
    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.stock(examples)
        trl_width = batch["input_ids"].shape[1]
        rows = [packed_pair_row(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
        width = max(len(ids) for ids, _, _ in rows)
        chosen_index, rejected_index = [], []
        for row, example in enumerate(examples):
            lengths = [len(example[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids")]
            if lengths[0] + max(lengths[1:]) > trl_width or not lengths[0]:
                raise ValueError("pair packing needs untruncated rows with a prompt (medtune fits pairs to "
                                 "max_length before collation)")
            chosen, rejected = reply_hidden_index(*lengths, row=row, width=width, trl_width=trl_width)
            chosen_index.append(chosen)
            rejected_index.append(rejected)

        def padded(column: int, value: int) -> torch.Tensor:
            return torch.stack([torch.nn.functional.pad(r[column], (0, width - len(r[column])), value=value)
                                for r in rows])

        batch["packed_input_ids"] = padded(0, self.pad_token_id)
        batch["packed_position_ids"] = padded(1, 0)
        batch["packed_segments"] = padded(2, PADDING)
        batch["packed_hidden_index"] = torch.stack(chosen_index + rejected_index)
        return batch


def without_packed_rows(batch: dict) -> dict:
    """The batch TRL's own two-row forward takes."""
    return {key: value for key, value in batch.items() if key not in PACKED_KEYS}


def packed_log_probs(model, labels: torch.Tensor, packed_input_ids, packed_position_ids, packed_segments,
                     packed_hidden_index, outputs: tuple[str, ...]):
    """TRL's FusedCausalLMOutput for its [chosen; rejected] `labels`, computed from the packed rows."""
    from trl.trainer.utils import FusedCausalLMOutput

    mask = pair_attention_mask(packed_segments, language_model(model).dtype)
    hidden = backbone_hidden_states(model, input_ids=packed_input_ids, position_ids=packed_position_ids,
                                    attention_mask=mask)
    del mask  # the layers keep what their backward needs
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = labels[:, 1:].to(hidden.device)
    scored = targets != -100
    # keep_softmax=False: the backward recomputes each slice's softmax rather than keeping one per reply token
    per_token = head_log_probs(model, hidden[packed_hidden_index[scored]], targets[scored], outputs,
                               keep_softmax=False, token_chunk=REPLY_SLICE)
    # masked_scatter keeps the result attached to the graph even when nothing is scored
    log_probs, entropy, log_sum_sq, mean_logits, is_top1 = (
        None if x is None else x.new_zeros(scored.shape).masked_scatter(scored, x) for x in per_token)
    loss = -log_probs.sum() / scored.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=scored)


def install_packed_pair_forward(model, outputs: tuple[str, ...], is_reference=lambda: False) -> None:
    """Wrap the (TRL-patched) forward: a call with the packed keys and `fused_lm_head=True` is answered from the
    packed rows; any other call drops the packed keys and goes to the forward underneath (TRL's own two-row path,
    e.g. the logits TRL recomputes for `compute_metrics`). While `is_reference()` (the reference pass) only the
    log-probs are computed: TRL reads nothing else from the reference."""
    target = language_model(model)
    if getattr(target, "_medtune_packed_pairs", False):
        return
    underneath = target.forward

    @functools.wraps(type(target).forward)
    def forward(self, *args, **kwargs):
        packed = {key: kwargs.pop(key, None) for key in PACKED_KEYS}
        if packed["packed_input_ids"] is None or not kwargs.get("fused_lm_head") or args:
            return underneath(*args, **kwargs)
        wanted = ("log_probs",) if is_reference() else outputs
        return packed_log_probs(self, kwargs["labels"], **packed, outputs=wanted)

    target.forward = types.MethodType(forward, target)
    target._medtune_packed_pairs = True


def adapters_disabled_probe(model):
    """A function telling whether peft's adapters are disabled right now (the LoRA reference pass)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return (lambda: False) if layer is None else (lambda: bool(layer.disable_adapters))


def packs_pairs(model) -> bool:
    """Pair packing applies to this model: a plain LM head, an attention backend that takes a 4-D mask (sdpa, eager;
    flash-attention kernels do not) and no MoE router loss (computed per row by the model's own forward)."""
    config = language_model(model).config
    return (has_plain_head(model) and config._attn_implementation in ("sdpa", "eager")
            and not getattr(config.get_text_config(), "output_router_logits", False))


def packed_pairs_dpo(trainer_class, enabled: bool = True):
    """A DPOTrainer subclass computing its log-probs from packed pair rows (when `enabled` and `packs_pairs`), with
    the reference pre-pass sorted by length."""

    class PackedPairDPOTrainer(trainer_class):
        def __init__(self, *args, data_collator=None, **kwargs):
            from trl.trainer.dpo_trainer import DataCollatorForPreference

            model, config, tokenizer = kwargs["model"], kwargs["args"], kwargs["processing_class"]
            self.packed_pairs = enabled and data_collator is None and packs_pairs(model)
            if self.packed_pairs:
                # TRL's collator as TRL would build it (medtune's rows are already fitted to max_length); TRL pads
                # with EOS when the tokenizer has no pad token.
                pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
                stock = DataCollatorForPreference(pad_token_id=pad, max_length=config.max_length,
                                                  truncation_mode=config.truncation_mode,
                                                  pad_to_multiple_of=config.pad_to_multiple_of)
                data_collator = PackedPairCollator(stock, pad)
            super().__init__(*args, data_collator=data_collator, **kwargs)

        def _packed_forward_ready(self) -> None:
            # TRL patches the forward with its fused head inside __init__ (and applies a peft_config there); the
            # packed path wraps that patch, so it is installed on first use (the reference pre-pass runs inside
            # __init__ too), once the head is known to be plain.
            if self.packed_pairs and not has_plain_head(self.model):
                self.packed_pairs = False  # e.g. LoRA on lm_head: TRL's own forward
            if self.packed_pairs:
                outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
                outputs += ("log_sum_sq_probs",) if self.use_weighting else ()
                adapters_disabled = adapters_disabled_probe(self.model)
                install_packed_pair_forward(self.model, outputs,
                                            lambda: self._in_reference_prepass or adapters_disabled())
                if self.ref_model is not None:  # full fine-tuning: a separate reference model
                    install_packed_pair_forward(self.accelerator.unwrap_model(self.ref_model), ("log_probs",))

        def _routed(self, inputs):
            self._packed_forward_ready()
            return inputs if self.packed_pairs else without_packed_rows(inputs)

        def _compute_loss(self, model, inputs, return_outputs):
            return super()._compute_loss(model, self._routed(inputs), return_outputs)

        _in_reference_prepass = False

        def compute_ref_log_probs(self, model, inputs):
            inputs = self._routed(inputs)
            self._in_reference_prepass = True
            try:
                return super().compute_ref_log_probs(model, inputs)
            finally:
                self._in_reference_prepass = False

        def _precompute_ref_logps(self, dataset, name, batch_size):
            """TRL's pre-pass (cached on disk by model hash and data fingerprint, no graph kept) over the pairs
            sorted by length, so each batch pads little."""
            if "length" not in dataset.column_names:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            lengths = dataset["length"]
            order = sorted(range(len(lengths)), key=lengths.__getitem__)
            restore = [0] * len(order)
            for position, index in enumerate(order):
                restore[index] = position
            computed = super()._precompute_ref_logps(dataset.select(order), name, batch_size)
            return computed.select(restore)

    PackedPairDPOTrainer.__name__ = f"PackedPair{trainer_class.__name__}"
    return PackedPairDPOTrainer

"""Log-probabilities computed only where a loss reads them.

A causal LM's head turns every position's hidden state into vocabulary-sized logits; the loss then reads one
number per *labelled* position. Prompt tokens carry no label, and the LM head of a small model costs as much as its
layers. Here only the hidden states of labelled positions go through the head, in chunks: on CUDA by TRL's fused
log-prob kernel (`trl.kernels.ChunkedLogProbFunction`, Triton: gather minus an online logsumexp, never a
full-vocabulary log-softmax), on CPU by plain chunked cross-entropy.

`install_label_only_forward` gives a model a forward that does this for the causal-LM loss (SFT, PT), and
`head_log_probs` is the shared piece the DPO pair packing (`medtune.stages.pair_packing`) uses too.
"""

from __future__ import annotations

import functools
import types

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from medtune.data.blocks import IGNORE_INDEX
from medtune.stages.common import MedtuneTrainer

# Heads that scale or cap their logits compute something else than `hidden @ weight.T`; those models keep the
# standard forward (transformers knows each one's arithmetic, we do not repeat it).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
# The kernel works on [tokens, vocab columns] tiles; calling it on at most TOKEN_CHUNK tokens at a time bounds that
# buffer (and the one its backward recomputes) to TOKEN_CHUNK x min(vocab, VOCAB_CHUNK) floats.
TOKEN_CHUNK = 1024
VOCAB_CHUNK = 32768


def language_model(model):
    """The transformers model under a peft wrapper (the module whose forward owns backbone + head)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def has_plain_head(model) -> bool:
    """Whether the model's logits are exactly `hidden @ lm_head.weight.T (+ bias)`: no logit scaling or capping, and
    no LoRA layer on the head (its `weight` is the base weight without the adapter's update; a fully trained copy,
    peft's modules_to_save, is fine: its `weight` is the copy in use)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    config = language_model(model).config.get_text_config()
    head = language_model(model).get_output_embeddings()
    return (all(getattr(config, name, None) is None for name in _LOGIT_TRANSFORMS)
            and not isinstance(head, BaseTunerLayer))


def head_log_probs(model, hidden: torch.Tensor, targets: torch.Tensor, outputs: tuple[str, ...] = ("log_probs",),
                   keep_softmax: bool = True, token_chunk: int = TOKEN_CHUNK):
    """(log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1) of `targets` [N] given `hidden` [N, H] through
    the model's LM head, only the requested optional fields filled (the fields of TRL's FusedCausalLMOutput).

    With Triton (CUDA, XPU): TRL's fused kernel over chunks of TOKEN_CHUNK rows, which recomputes each logits tile
    in its backward, so no [N, vocab] tensor outlives a chunk. Elsewhere (CPU): `_LinearLogProbs` over chunks of
    `token_chunk` rows, for the given rows only, keeping each chunk's softmax for the backward (`keep_softmax`, when
    a backward can follow) or recomputing it there (then a small `token_chunk` keeps the transient [chunk, vocab]
    tensors small too); the kernel's torch fallback is several times slower per token on CPU."""
    from trl.kernels.chunked_logprob import _use_triton

    head = language_model(model).get_output_embeddings()
    hidden, targets = hidden.to(head.weight.device), targets.to(head.weight.device)
    if _use_triton(hidden.device):
        chunk, token_chunk = _fused_chunk, TOKEN_CHUNK
    else:
        keep = keep_softmax and torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
        chunk = functools.partial(_plain_chunk, keep_softmax=keep)
    # split, not indexing: the backward joins the chunks' gradients in one concatenation instead of adding a
    # zero-padded full-size gradient per chunk (nothing to score: one empty chunk, still attached to the graph)
    pieces = [chunk(part, head, wanted, outputs)
              for part, wanted in zip(hidden.split(token_chunk), targets.split(token_chunk), strict=True)]
    return tuple(None if field[0] is None else torch.cat(field) for field in zip(*pieces))


def _fused_chunk(hidden, head, targets, outputs):
    from trl.kernels import ChunkedLogProbFunction

    vocab_chunk = min(VOCAB_CHUNK, head.weight.shape[0])
    return ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, targets, 1.0, vocab_chunk, None, 1.0, outputs)


class _LinearLogProbs(torch.autograd.Function):
    """log p(target) through a linear head, plus the statistics TRL logs (`outputs`), one softmax (or, with
    statistics, one log-softmax) per chunk.

    Cross-entropy's own backward builds a zero [N, vocab] gradient, scatters into it, and then recomputes the
    softmax from the saved log-softmax: three more passes over the largest tensor of the step. Here the backward
    subtracts the targets' one-hot from the softmax in place (N entries) and multiplies it into the gradients, the
    loss's row factor applied on the hidden-size side. With `keep_softmax` the forward keeps that softmax (sft, pt:
    fastest); without, the backward recomputes its chunk's logits (DPO: its two replies per row make the kept softmax a large memory term). The statistics carry no
    gradient (TRL logs them) and are computed from the same log-softmax, the mean logit from the hidden state and
    the mean weight row: no second [N, vocab] tensor of logits or probabilities (TRL's DPO asks for entropy, mean
    logit and top-1 on every step; computing them from separate logits was DPO's largest memory term)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, outputs, keep_softmax):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        compute_dtype = logits.dtype
        if outputs == ("log_probs",):
            log_probs, probs = _log_probs_and_softmax(logits.float(), targets, keep_softmax)
            del logits
            entropy = log_sum_sq = mean_logits = is_top1 = None
        else:
            log_softmax = torch.log_softmax(logits.float(), dim=-1)
            del logits  # the largest tensor of the step: at most two of its size live at a time
            log_probs, probs, (entropy, log_sum_sq, mean_logits, is_top1) = _with_statistics(
                log_softmax, hidden, weight, bias, targets, outputs, keep_softmax)
        ctx.save_for_backward(hidden, weight, bias, targets, probs if keep_softmax else None)
        # the dtype the head multiplied in (autocast may have chosen another than the weight's or the input's):
        # the backward's products run in it too, as linear's own backward would
        ctx.used, ctx.kept, ctx.compute_dtype, ctx.weight_dtype = False, keep_softmax, compute_dtype, weight.dtype
        ctx.mark_non_differentiable(*(x for x in (entropy, log_sum_sq, mean_logits, is_top1) if x is not None))
        return log_probs, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_log_probs, *_statistics):
        if ctx.used:  # the kept softmax became softmax - onehot in place
            raise RuntimeError("medtune's label-only head supports one backward pass per forward")
        ctx.used = ctx.kept
        hidden, weight, bias, targets, probs = ctx.saved_tensors
        cast = ctx.compute_dtype
        if probs is None:
            logits = torch.nn.functional.linear(hidden.to(cast), weight.to(cast), None if bias is None else bias.to(cast))
            probs = torch.softmax(logits.float(), dim=-1)
            del logits
        # d log p_t / d logits = -(softmax - onehot(t)), formed in float32 on the N target entries only (in bfloat16 a
        # confident p_t would round to 1 and its gradient vanish); the row factor g goes on the [N, hidden] or [N]
        # side of each product, so there is no pass over [N, vocab] besides the products themselves
        probs[torch.arange(len(targets), device=targets.device), targets] -= 1
        shifted, grad = probs.to(cast), -grad_log_probs.to(cast)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (shifted @ weight.to(cast)).mul_(grad[:, None]).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = (shifted.T @ (hidden.to(cast) * grad[:, None])).to(ctx.weight_dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_bias = (shifted.T @ grad).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def _log_probs_and_softmax(logits: torch.Tensor, targets: torch.Tensor, keep_softmax: bool):
    """(log p(target), softmax or None) from float32 `logits` [N, vocab], in one softmax pass (the kernel is faster
    than log-softmax followed by exp). log p is read off the softmax where that is exact to float32 rounding; a
    probability too small for that (below 2^-100, so it may have underflowed) is recomputed from its row's logits."""
    probs = torch.softmax(logits, dim=-1)
    target_probs = probs.gather(1, targets[:, None]).squeeze(1)
    log_probs = target_probs.log()
    tiny = target_probs < 2.0 ** -100
    if tiny.any():
        rows = logits[tiny]
        log_probs[tiny] = rows.gather(1, targets[tiny][:, None]).squeeze(1) - torch.logsumexp(rows, dim=-1)
    return log_probs, probs if keep_softmax else None


def _with_statistics(log_softmax, hidden, weight, bias, targets, outputs, keep_softmax):
    """(log p(target), softmax or None, (entropy, log_sum_sq_probs, mean_logits, is_top1)) from the chunk's float32
    log-softmax, which this overwrites."""
    log_probs = log_softmax.gather(1, targets[:, None]).squeeze(1)
    is_top1 = log_softmax.argmax(-1) == targets if "is_top1" in outputs else None  # the first maximum, as TRL
    mean_logits = None
    if "mean_logits" in outputs:
        # the mean row in the weight's dtype (reductions accumulate in float32): no float32 copy of the head
        mean_logits = hidden.float() @ weight.mean(0).float() + (0.0 if bias is None else bias.float().mean())
    entropy = probs = None
    if "entropy" in outputs:  # needs log p and p at once
        probs = log_softmax.exp()
        entropy = -log_softmax.mul_(probs).sum(-1)
    elif keep_softmax or "log_sum_sq_probs" in outputs:
        probs = log_softmax.exp_()  # in place: no second [N, vocab] tensor
    log_sum_sq = (2 * torch.linalg.vector_norm(probs, dim=-1).log() if "log_sum_sq_probs" in outputs else None)
    return log_probs, probs if keep_softmax else None, (entropy, log_sum_sq, mean_logits, is_top1)


def _plain_chunk(hidden, head, targets, outputs, keep_softmax=True):
    return _LinearLogProbs.apply(hidden, head.weight, head.bias, targets, outputs, keep_softmax)


def backbone_hidden_states(model, **kwargs) -> torch.Tensor:
    """The last hidden states of the model's layers (no head), with the KV cache off."""
    kwargs["use_cache"] = False
    return language_model(model).base_model(**kwargs).last_hidden_state


def loss_at_labelled_positions(model, labels: torch.Tensor, num_items_in_batch=None, **kwargs) -> torch.Tensor:
    """The causal-LM loss transformers computes (mean next-token cross-entropy over labelled positions, or the sum
    divided by `num_items_in_batch` under gradient accumulation), with the head run only at labelled positions."""
    hidden = backbone_hidden_states(model, **kwargs)
    # each position's next token, IGNORE_INDEX after the last: selecting from the unsliced hidden states spares the
    # backward a zero-filled copy of them
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).to(hidden.device)
    supervised = targets != IGNORE_INDEX
    log_probs = head_log_probs(model, hidden[supervised], targets[supervised])[0]
    total = log_probs.sum()  # an empty selection still gives a differentiable 0
    divisor = num_items_in_batch if num_items_in_batch is not None else supervised.sum().clamp(min=1)
    return -total / divisor


def install_label_only_forward(model) -> bool:
    """Make `model(..., label_only_loss=True, labels=...)` return the loss computed by `label_only_loss` (no logits);
    without the flag the forward is the model's own. Returns False (nothing installed) for heads that are not plain.
    """
    target = language_model(model)
    if not has_plain_head(target) or getattr(target, "_medtune_label_only", False):
        return getattr(target, "_medtune_label_only", False)
    original = target.forward

    @functools.wraps(type(target).forward)  # the Trainer inspects the signature for loss kwargs
    def forward(self, *args, label_only_loss: bool = False, **kwargs):
        if not label_only_loss or kwargs.get("labels") is None or args:
            return original(*args, **kwargs)
        return CausalLMOutputWithPast(loss=loss_at_labelled_positions(self, **kwargs))

    target.forward = types.MethodType(forward, target)
    target._medtune_label_only = True
    return True


class LabelOnlyLossTrainer(MedtuneTrainer):
    """MedtuneTrainer whose training steps run the LM head only at labelled positions (`loss_only_labels`).

    Evaluation keeps the standard forward: its token accuracy reads the argmax of every position's logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_only = self.args.loss_only_labels and install_label_only_forward(
            self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.label_only and model.training and not return_outputs and "labels" in inputs:
            inputs = {**inputs, "label_only_loss": True}
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def causal_lm_trainer(model, training_args, train_set, eval_set, tokenizer, collator, callbacks):
    """The Trainer pt and sft run: the label-only loss in training; token accuracy (and perplexity) when there is
    an evaluation set."""
    from medtune.stages.common import argmax_logits, token_accuracy

    evaluated = eval_set is not None
    return LabelOnlyLossTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=eval_set,
                                processing_class=tokenizer, data_collator=collator, callbacks=callbacks,
                                compute_metrics=token_accuracy if evaluated else None,
                                preprocess_logits_for_metrics=argmax_logits if evaluated else None)

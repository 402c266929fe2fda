"""LoRA linear layers computed in fewer passes on CPU.

peft computes a LoRA linear layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: besides the three matrix
products, two elementwise passes over the [tokens, out_features] output in the forward (the scaling, the sum) and
one more in the backward (the scaling again), and autograd adds the adapter's input gradient to the base layer's in a
further pass over [tokens, in_features]. `_FusedLoraLinear` computes the same function with the scaling applied by the product that writes the output
(`addmm`'s alpha) and the adapter's input gradient accumulated into the base layer's as it is formed (`addcmul_`);
the dropout mask is FastDropout's (`medtune.models.dropout`). It saves what peft's path saves for the backward (the
dropped input, the rank-r activations) and the dropout's float mask rather than its 16-bit random draws: 2 bytes
more per input element, which spares the backward rebuilding the mask.

Only the plain case takes this path: a training-or-eval forward on CPU without autocast, one active vanilla adapter
(no DoRA or other variant, no LoRA bias) on an `nn.Linear` whose weight is frozen, every tensor in one dtype, the
dropout a `FastDropout` or none. Anything else (CUDA, where these passes are cheap and this path is unmeasured;
a quantised base; mixed adapters; merged weights; disabled adapters, e.g. DPO's reference pass; ZeRO-3-partitioned weights) runs peft's
own forward. On the fused path the forward hooks of the base layer and of `lora_A`/`lora_B` do not run (the LoRA
layer's own do): a tool that hooks those submodules (activation capture, pruning) sees nothing of CPU training
steps.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from medtune.models.dropout import (
    FastDropout,
    keep_scale,
    quantised_probability,
    random_quarters,
    use_fast_lora_dropout,
)


class _FusedLoraLinear(torch.autograd.Function):
    """x @ W.T + b + scaling * (dropout(x) @ A.T) @ B.T for x [N, in]; W and b frozen."""

    @staticmethod
    def forward(ctx, inputs, weight, bias, lora_a, lora_b, scaling, p):
        output = torch.mm(inputs, weight.T) if bias is None else torch.addmm(bias, inputs, weight.T)
        keep = keep_scale(random_quarters(inputs.shape, device=inputs.device), p, inputs.dtype) if p else None
        dropped = inputs * keep if p else inputs
        low_rank = torch.mm(dropped, lora_a.T)
        output.addmm_(low_rank, lora_b.T, alpha=scaling)
        ctx.save_for_backward(weight, lora_a, lora_b, dropped, low_rank, keep)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return output

    @staticmethod
    def backward(ctx, grad_output):
        weight, lora_a, lora_b, dropped, low_rank, keep = ctx.saved_tensors
        grad_low_rank = torch.mm(grad_output, lora_b).mul_(ctx.scaling)
        grad_a = torch.mm(grad_low_rank.T, dropped) if ctx.needs_input_grad[3] else None
        grad_b = torch.mm(grad_output.T, low_rank).mul_(ctx.scaling) if ctx.needs_input_grad[4] else None
        grad_inputs = None
        if ctx.needs_input_grad[0]:
            grad_inputs = torch.mm(grad_output, weight)
            through_adapter = torch.mm(grad_low_rank, lora_a)
            if keep is not None:
                grad_inputs.addcmul_(through_adapter, keep)
            else:
                grad_inputs.add_(through_adapter)
        grad_bias = grad_output.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_inputs, None, grad_bias, grad_a, grad_b, None, None


def _dropout_probability(dropout: nn.Module) -> float | None:
    """The drop probability the fused path applies for this adapter's dropout module; None: not one it can apply."""
    if isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is FastDropout:
        if not dropout.training:
            return 0.0
        realised = quantised_probability(dropout.p)
        return realised if 0 < realised < 1 else None  # where FastDropout itself falls back to nn.Dropout
    return None


def _fused_adapter(layer, inputs: torch.Tensor, args: tuple, kwargs: dict):
    """(base, A, B, scaling, p) when `layer`'s forward on `inputs` is the plain case the fused path computes."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    base = layer.get_base_layer()
    if (name not in layer.lora_A or name in layer.lora_variant or layer.lora_bias.get(name)
            or type(base) is not nn.Linear or base.weight.requires_grad):
        return None
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    p = _dropout_probability(layer.lora_dropout[name])
    tensors = (inputs, base.weight, lora_a, lora_b) + (() if base.bias is None else (base.bias,))
    # DeepSpeed ZeRO-3 partitions parameters (`ds_id`) and gathers each one in its own module's forward hook, which
    # reading the weights here would bypass
    if (p is None or inputs.device.type != "cpu" or torch.is_autocast_enabled("cpu")
            or len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1
            or any(hasattr(t, "ds_id") for t in tensors)):
        return None
    return base, lora_a, lora_b, layer.scaling[name], p


class FusedLoraLinear(LoraLinear):
    """peft's `lora.Linear`, computed by `_FusedLoraLinear` in the plain case (see the module docstring). A class
    (set on existing layers by `use_fast_lora`) rather than a per-instance forward, so models still pickle."""

    def forward(self, inputs: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plain = _fused_adapter(self, inputs, args, kwargs)
        if plain is None:
            return super().forward(inputs, *args, **kwargs)
        base, lora_a, lora_b, scaling, p = plain
        flat = inputs.reshape(-1, inputs.shape[-1])
        output = _FusedLoraLinear.apply(flat, base.weight, base.bias, lora_a, lora_b, scaling, p)
        return output.view(*inputs.shape[:-1], output.shape[-1])


def use_fast_lora(model) -> int:
    """FastDropout in front of every LoRA adapter of `model` (`use_fast_lora_dropout`) and the fused forward on
    every peft LoRA `Linear` (exactly that class: subclasses keep theirs); returns how many layers got the fused
    forward (each decides per call whether its case is plain)."""
    use_fast_lora_dropout(model)
    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear:
            module.__class__ = FusedLoraLinear
            fused += 1
    return fused

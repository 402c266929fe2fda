"""LoRA dropout that draws its random mask cheaply on CPU.

peft puts an `nn.Dropout` in front of every LoRA adapter. On CPU, torch draws dropout's mask with one Mersenne
Twister call per element (`bernoulli_`), serially: on the tiny models that was the largest cost of a training step
after the matrix products (a torch.profiler trace of SFT and PT steps). `FastDropout` draws one
64-bit random number per four elements and compares each 16-bit quarter with a threshold, so the drop probability
is `p` rounded to a multiple of 1/65536 (0.05 -> 0.0500031), and kept values are scaled by 1 / (1 - that
probability): the output's expectation is the input (exactly in float32; in bfloat16 the scale itself rounds,
1/0.95 to 1.0547, as it does in torch's dropout). Only the random stream
differs from `nn.Dropout`; on other devices (CUDA's dropout is a fast fused kernel) and in eval mode it *is*
`nn.Dropout`.
"""

from __future__ import annotations

import torch
from torch import nn

QUANTUM = 1 << 16  # the drop probability's resolution: each element gets 16 random bits


def quantised_probability(p: float) -> float:
    """The drop probability `FastDropout` realises for `p`."""
    return round(p * QUANTUM) / QUANTUM


def random_quarters(shape: torch.Size, device=None, generator=None) -> torch.Tensor:
    """int16 values of `shape`, independent and uniform over [-32768, 32767]: four from each 64-bit draw."""
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(2 ** 63), None, generator=generator)  # the full 64-bit range: all four quarters are uniform
    return words.view(torch.int16)[:count].view(shape)


def keep_scale(quarters: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """1 / (1 - p') where an element is kept and 0 where it is dropped; round(p * 65536) of the 65536 int16 values,
    the lowest, are dropped (p' = quantised_probability(p)).

    Arithmetic rather than a comparison: on CPU a boolean mask costs several times more to make and to apply than
    this float one (measured single-threaded on a [1024, 256] tensor: 0.09 ms to build, 0.10 ms to apply, against
    0.10 + 0.28 ms for compare + masked_fill)."""
    threshold = round(p * QUANTUM) - QUANTUM // 2  # values below it are dropped
    # integers: q - (threshold - 1) is >= 1 exactly when q >= threshold, so clamping to [0, 1] gives the keep mask
    # in float32: bfloat16 and float16 cannot hold every int16 value exactly
    scale = 1.0 / (1.0 - quantised_probability(p))
    return quarters.to(torch.float32).sub_(threshold - 1).clamp_(0, 1).mul_(scale).to(dtype)


class _RandomScale(torch.autograd.Function):
    """inputs * keep_scale(quarters): the backward rebuilds the scale from the int16 quarters it saved (2 bytes an
    element) rather than keeping a float mask."""

    @staticmethod
    def forward(ctx, inputs, quarters, p):
        ctx.save_for_backward(quarters)
        ctx.p = p
        return inputs * keep_scale(quarters, p, inputs.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        (quarters,) = ctx.saved_tensors
        return grad_output * keep_scale(quarters, ctx.p, grad_output.dtype), None, None


class FastDropout(nn.Dropout):
    """`nn.Dropout` with a cheaper random mask on CPU (see the module docstring)."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.training or inputs.device.type != "cpu" or not 0 < quantised_probability(self.p) < 1:
            return super().forward(inputs)
        return _RandomScale.apply(inputs, random_quarters(inputs.shape, device=inputs.device), self.p)


def use_fast_lora_dropout(model) -> int:
    """Swap every LoRA adapter's `nn.Dropout` in `model` for a `FastDropout` of the same rate; returns how many.
    Adapters without dropout (`nn.Identity`) are left alone."""
    swapped = 0
    for module in model.modules():
        adapters = getattr(module, "lora_dropout", None)
        if not isinstance(adapters, nn.ModuleDict):
            continue
        for name, dropout in adapters.items():
            if type(dropout) is nn.Dropout:
                adapters[name] = FastDropout(dropout.p, dropout.inplace).train(dropout.training)
                swapped += 1
    return swapped

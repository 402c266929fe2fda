"""FastDropout, the LoRA dropout with a cheaper random mask on CPU: the same distribution as nn.Dropout (drop
probability p rounded to 1/65536, kept values scaled to keep the expectation), a backward that masks exactly what
the forward dropped, and nn.Dropout's own behaviour in eval mode."""

import pytest
import torch
from torch import nn

from medtune.models.dropout import FastDropout, quantised_probability, use_fast_lora_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_elements_are_dropped_at_the_rate_p_and_kept_ones_scaled(p):
    torch.manual_seed(0)
    inputs = torch.randn(1000, 4000)
    outputs = FastDropout(p).train()(inputs)
    dropped = outputs == 0
    rate, n = dropped.float().mean().item(), inputs.numel()
    realised = quantised_probability(p)
    assert abs(realised - p) <= 1 / 2 ** 17
    # within 5 standard deviations of a binomial rate over 4M draws
    assert abs(rate - realised) < 5 * (realised * (1 - realised) / n) ** 0.5
    torch.testing.assert_close(outputs[~dropped], inputs[~dropped] / (1 - realised))


def test_every_bit_of_every_quarter_is_used():
    """Rows and columns get independent masks: no lane of the 64-bit draws is constant (a 63-bit draw, the
    default of random_(), would leave one int16 quarter never negative and bias that lane's rate)."""
    torch.manual_seed(1)
    dropped = FastDropout(0.5).train()(torch.ones(4, 1 << 18)) == 0
    lanes = dropped.reshape(-1, 4).float().mean(0)
    assert torch.all((lanes - 0.5).abs() < 0.005), lanes


def test_backward_masks_exactly_what_the_forward_dropped():
    torch.manual_seed(2)
    inputs = torch.randn(64, 256, requires_grad=True)
    outputs = FastDropout(0.2).train()(inputs)
    upstream = torch.randn_like(outputs)
    outputs.backward(upstream)
    scale = outputs.detach() / inputs.detach()  # 0 where dropped, 1/(1-p') where kept
    torch.testing.assert_close(inputs.grad, upstream * scale)


def test_the_expectation_is_the_input():
    torch.manual_seed(3)
    inputs = torch.randn(8, 16)
    mean = torch.stack([FastDropout(0.3).train()(inputs) for _ in range(20000)]).mean(0)
    torch.testing.assert_close(mean, inputs, atol=0.03, rtol=0)


def test_bfloat16_drops_the_same_elements_as_float32_under_the_same_seed():
    inputs = torch.randn(128, 256)
    torch.manual_seed(4)
    full = FastDropout(0.05).train()(inputs)
    torch.manual_seed(4)
    half = FastDropout(0.05).train()(inputs.bfloat16())
    assert half.dtype == torch.bfloat16
    assert torch.equal(full == 0, half == 0)


def test_eval_mode_and_p_zero_pass_the_input_through():
    inputs = torch.randn(16, 32)
    assert torch.equal(FastDropout(0.05).eval()(inputs), inputs)
    assert torch.equal(FastDropout(0.0).train()(inputs), inputs)


@pytest.mark.parametrize("rate", [0.05, 0.0])
def test_lora_adapters_get_fast_dropout_and_eval_logits_do_not_move(tiny_model, rate):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model("qwen2"), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=rate, target_modules="all-linear",
                                             init_lora_weights=False))
    ids = torch.arange(5, 25)[None]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    adapters = [m.lora_dropout["default"] for m in model.modules() if isinstance(getattr(m, "lora_dropout", None),
                                                                                   nn.ModuleDict)]
    swapped = use_fast_lora_dropout(model)
    after_types = {type(m.lora_dropout["default"]) for m in model.modules()
                   if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)}
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    if rate:
        assert swapped == len(adapters) > 0 and after_types == {FastDropout}
        assert all(m.p == rate for m in model.modules() if isinstance(m, FastDropout))
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            assert not torch.equal(model(input_ids=ids).logits, before)  # dropout acts in training
    else:
        assert swapped == 0 and after_types == {nn.Identity}


def test_pt_and_sft_adapters_train_with_fast_dropout(tiny_model):
    from transformers import AutoModelForCausalLM

    from medtune.config import LoraArguments
    from medtune.models.loader import attach_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model("glm4"), dtype=torch.float32)
    model = attach_lora(model, LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.1))
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts and all(type(m) is FastDropout and m.p == 0.1 for m in dropouts)

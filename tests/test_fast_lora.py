"""The fused LoRA linear layers (medtune.models.fast_lora): the same loss and gradients as peft's own forward with
the same dropout mask, and peft's forward wherever the case is not the plain one."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from medtune.models import fast_lora
from medtune.models.dropout import use_fast_lora_dropout
from medtune.models.fast_lora import FusedLoraLinear, _fused_adapter, use_fast_lora


def peft_model(tiny_model, arch: str, rate: float, **config):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch), dtype=torch.float32)
    torch.manual_seed(0)  # the adapters' initial weights (random A and B, so every product matters)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=rate, target_modules="all-linear",
                                            init_lora_weights=False, **config))


def loss_and_gradients(model, ids, seed: int = 1, checkpointing: bool = False):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(seed)  # the dropout masks: both paths draw the same bits in the same order
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,rate", [("qwen2", 0.1), ("glm4", 0.05), ("llama", 0.0)])
def test_fused_layers_give_peft_s_loss_and_gradients(tiny_model, monkeypatch, arch, rate):
    """qwen2's q/k/v have a bias, glm4's fused gate_up is 2x wider than its input, llama runs without dropout."""
    reference = peft_model(tiny_model, arch, rate)
    fused = copy.deepcopy(reference)
    use_fast_lora_dropout(reference)  # the same FastDropout masks, through peft's forward
    layers = use_fast_lora(fused)
    assert layers == sum(isinstance(m, nn.ModuleDict) for m in [getattr(m, "lora_A", None) for m in fused.modules()])
    ids = torch.randint(3, 200, (2, 24))
    expected_loss, expected = loss_and_gradients(reference, ids)
    drops = []  # the drop probability of every fused call: the training forward takes the fused path, dropout included
    original = fast_lora._FusedLoraLinear.forward
    monkeypatch.setattr(fast_lora._FusedLoraLinear, "forward",
                        staticmethod(lambda ctx, *args: drops.append(args[-1]) or original(ctx, *args)))
    loss, gradients = loss_and_gradients(fused, ids)
    monkeypatch.undo()
    assert len(drops) == layers and set(drops) == {fast_lora.quantised_probability(rate)}
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
    assert gradients.keys() == expected.keys() and any("lora_A" in name for name in gradients)
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected[name], rtol=1e-4, atol=1e-5 * expected[name].abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")
    if rate:  # the dropout acted: another mask gives another loss
        assert not torch.equal(loss_and_gradients(fused, ids, seed=2)[0], loss)


def test_gradient_checkpointing_recomputes_the_same_dropout_mask(tiny_model):
    model = peft_model(tiny_model, "glm4", 0.1)
    checkpointed = copy.deepcopy(model)
    use_fast_lora(model), use_fast_lora(checkpointed)
    ids = torch.randint(3, 200, (2, 24))
    expected_loss, expected = loss_and_gradients(model, ids)
    loss, gradients = loss_and_gradients(checkpointed, ids, checkpointing=True)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-6)
    for name, gradient in expected.items():
        torch.testing.assert_close(gradients[name], gradient, rtol=1e-4, atol=1e-5 * gradient.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def first_lora_layer(model):
    from peft.tuners.lora import Linear

    return next(m for m in model.modules() if isinstance(m, Linear))


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed")  # peft, for layers without a bias: expected
@pytest.mark.parametrize("case", ["plain", "adapter disabled", "merged", "autocast", "trained base weight", "dora",
                                  "lora bias", "nn.Dropout", "adapter_names", "ZeRO-3 partitioned"])
def test_only_the_plain_case_is_fused_and_every_case_keeps_peft_s_output(tiny_model, case):
    config = {"dora": {"use_dora": True}, "lora bias": {"lora_bias": True}}.get(case, {})
    model = peft_model(tiny_model, "qwen2", 0.1, **config)
    if case != "nn.Dropout":
        use_fast_lora_dropout(model)
    layer = first_lora_layer(model)
    layer.eval()  # no dropout: peft's output is deterministic, so both forwards can be compared
    inputs = torch.randn(3, layer.in_features)
    kwargs, context = {}, contextlib.nullcontext()
    if case == "adapter disabled":
        layer.enable_adapters(False)
    elif case == "merged":
        layer.merge()
    elif case == "autocast":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    elif case == "trained base weight":
        layer.get_base_layer().weight.requires_grad_(True)
    elif case == "ZeRO-3 partitioned":  # what DeepSpeed marks a partitioned parameter with (gathered by its hooks)
        layer.get_base_layer().weight.ds_id = 0
    elif case == "adapter_names":
        kwargs = {"adapter_names": ["default"] * 3}
    peft_forward = type(layer).forward
    layer.__class__ = FusedLoraLinear
    with context, torch.no_grad():
        plain = _fused_adapter(layer, inputs, (), kwargs) is not None
        expected = peft_forward(layer, inputs, **kwargs)
        output = layer(inputs, **kwargs)
    assert plain == (case == "plain")
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


def test_stages_attach_fused_layers(tiny_model):
    from peft.tuners.lora import Linear
    from transformers import AutoModelForCausalLM

    from medtune.config import LoraArguments
    from medtune.models.loader import attach_lora

    model = AutoModelForCausalLM.from_pretrained(tiny_model("glm4"), dtype=torch.float32)
    model = attach_lora(model, LoraArguments(lora_rank=4, lora_alpha=8, lora_dropout=0.1))
    layers = [m for m in model.modules() if isinstance(m, Linear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)


def test_a_model_with_fused_layers_pickles_and_computes_the_same(tiny_model):
    import io

    model = peft_model(tiny_model, "qwen2", 0.1)
    use_fast_lora(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert {type(m) for m in loaded.modules()} >= {FusedLoraLinear}
    ids = torch.randint(3, 200, (1, 12))
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

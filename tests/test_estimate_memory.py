"""`medtune estimate-memory`: parameter counts against real models, memory components against hand computation."""

from __future__ import annotations

import json

import pytest

from medtune.errors import ConfigError
from medtune.estimate import GIB, NF4_BYTES, Architecture, Setup, estimate, read_config

from .conftest import REPO, run_medtune

CONFIGS = REPO / "tests" / "data" / "configs"
GLM4_9B = CONFIGS / "glm-4-9b-chat-hf.json"
QWEN25_7B = CONFIGS / "qwen2.5-7b.json"


def architecture(path) -> Architecture:
    return Architecture.from_config(*read_config(str(path)))


@pytest.mark.parametrize("arch", ["glm4", "qwen2", "llama"])
def test_parameter_and_lora_counts_equal_the_real_models(arch, tiny_model):
    from transformers import AutoModelForCausalLM

    from medtune.config import LoraArguments
    from medtune.models.loader import attach_lora

    folder = tiny_model(arch)
    model = AutoModelForCausalLM.from_pretrained(folder)
    counted = architecture(folder)
    assert counted.parameters() == sum(p.numel() for p in model.parameters())
    lora = attach_lora(model, LoraArguments(lora_rank=8))
    assert counted.lora_parameters(8) == lora.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("path, params", [(GLM4_9B, 9_399_951_360), (QWEN25_7B, 7_615_616_512)])
def test_real_model_sizes_from_config_alone(path, params):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = json.loads(path.read_text())
    with torch.device("meta"):  # the real architecture, built without memory
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    assert architecture(path).parameters() == sum(p.numel() for p in model.parameters()) == params


def test_glm4_9b_by_hand():
    arch = architecture(GLM4_9B)
    h, i, layers, vocab = 4096, 13696, 40, 151552
    q, kv = 32 * 128, 2 * 128
    linears = h * q + 2 * h * kv + q * h + h * 2 * i + i * h
    assert arch.parameters() == layers * (linears + q + 2 * kv + 2 * h) + 2 * vocab * h + h
    assert arch.lora_parameters(8) == layers * 8 * ((h + q) + 2 * (h + kv) + (q + h) + (h + 2 * i) + (i + h))
    assert arch.linear_weights() == layers * linears


def test_components_for_full_fine_tuning_with_zero():
    arch = architecture(QWEN25_7B)
    p = arch.parameters()
    zero0 = estimate(arch, Setup(method="full", zero=0, gpus=8))
    assert (zero0["weights"], zero0["gradients"], zero0["optimizer"]) == (2 * p, 2 * p, 4 * p)  # bf16 AdamW
    zero2 = estimate(arch, Setup(method="full", zero=2, gpus=8))
    assert (zero2["weights"], zero2["gradients"], zero2["optimizer"]) == (2 * p, 2 * p / 8, 12 * p / 8)
    zero3 = estimate(arch, Setup(method="full", zero=3, gpus=8))
    assert (zero3["weights"], zero3["gradients"], zero3["optimizer"]) == (2 * p / 8, 2 * p / 8, 12 * p / 8)
    assert zero3["activations"] == zero2["activations"] == zero0["activations"]  # data parallel: not sharded
    assert zero3["total"] == sum(zero3[k] for k in ("weights", "gradients", "optimizer", "activations"))


def test_lora_and_qlora_components():
    arch = architecture(GLM4_9B)
    p, t, linear = arch.parameters(), arch.lora_parameters(8), arch.linear_weights()
    lora = estimate(arch, Setup(method="lora"))
    assert (lora["weights"], lora["gradients"], lora["optimizer"]) == (2 * p + 4 * t, 4 * t, 8 * t)
    qlora = estimate(arch, Setup(method="qlora"))
    assert NF4_BYTES[True] == pytest.approx(0.515869, abs=1e-6)
    assert qlora["weights"] == pytest.approx(linear * NF4_BYTES[True] + (p - linear) * 4 + 4 * t)
    # peft upcasts GLM-4's 1.24 B embedding and head weights to float32: 4.6 GiB of the 8.6 GiB
    embeddings = 2 * 151552 * 4096
    assert round(embeddings * 4 / GIB, 1) == 4.6 and round(qlora["weights"] / GIB, 1) == 8.6


def test_activations_by_hand_and_with_checkpointing():
    arch = architecture(GLM4_9B)
    h, i, layers, vocab = 4096, 13696, 40, 151552
    per_layer = 2 * (6 * h + 2 * (32 + 2) * 128 + 4 * i)
    full = estimate(arch, Setup(method="full", seq=2048, batch=2))
    assert full["activations"] == 2 * 2048 * (layers * per_layer + 10 * vocab)
    dropout = 3 * (3 * h + 32 * 128 + h + i)  # inputs of q, k, v, o, gate_up, down
    lora = estimate(arch, Setup(method="lora", seq=2048, batch=2))
    assert lora["activations"] == 2 * 2048 * (layers * (per_layer + dropout) + 10 * vocab)
    checkpointed = estimate(arch, Setup(method="full", seq=2048, batch=2, gradient_checkpointing=True))
    assert checkpointed["activations"] == 2 * 2048 * (layers * 2 * h + per_layer + 10 * vocab)


def test_cli_glm4_9b_lora_bf16_prints_the_documented_total():
    result = run_medtune("estimate-memory", "--model", str(GLM4_9B), "--method", "lora", "--zero", "0", "--gpus",
                         "1", "--seq", "2048", "--batch", "1")
    assert result.returncode == 0, result.stderr
    assert "weights        17.60 GiB" in result.stdout
    assert "total          42.01 GiB" in result.stdout  # the figure docs/scale.md explains
    as_json = run_medtune("estimate-memory", "--model", str(GLM4_9B), "--json")
    payload = json.loads(as_json.stdout)
    assert round(payload["total"] / GIB, 2) == 42.01


def test_bad_inputs_are_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}')
    result = run_medtune("estimate-memory", "--model", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model_type 'bert' is not one estimate-memory knows" in result.stderr
    with pytest.raises(ConfigError, match="gpus must be at least 1"):
        Setup(gpus=0)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 8}')
    with pytest.raises(ConfigError, match="num_attention_heads: missing"):
        architecture(tmp_path)

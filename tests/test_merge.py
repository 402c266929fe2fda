"""`medtune merge`: the merged model reproduces base+adapter logits and never overwrites its inputs."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from .conftest import run_medtune


@pytest.fixture(scope="module")
def trained_adapter(glm4_dir, tmp_path_factory):
    """An adapter with non-trivial weights (LoRA B starts at zero, which would make any merge look right)."""
    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(glm4_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(glm4_dir).save_pretrained(folder)
    return folder


def test_merge_matches_base_plus_adapter(glm4_dir, trained_adapter, tmp_path):
    out = tmp_path / "merged"
    result = run_medtune("merge", "--base_model", str(glm4_dir), "--lora_model", str(trained_adapter),
                         "--output_dir", str(out), "--model_type", "chatglm")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "chat_template.jinja", "merge_check.json"):
        assert (out / name).is_file(), name
    check = json.loads((out / "merge_check.json").read_text())
    assert check["max_abs_logit_difference"] <= 1e-4

    # independent check: reload both and compare on a fresh input
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("高血压患者应定期监测血压。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(glm4_dir), trained_adapter)
        merged = AutoModelForCausalLM.from_pretrained(out)
        base = AutoModelForCausalLM.from_pretrained(glm4_dir)
        expected = reference(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - expected).abs().max() < 1e-4
        assert (base(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapter really changed something


def test_merge_defaults_base_from_adapter_and_refuses_to_overwrite_inputs(glm4_dir, trained_adapter, tmp_path):
    result = run_medtune("merge", "--lora_model", str(trained_adapter), "--output_dir", str(glm4_dir))
    assert result.returncode == 2
    assert "is the base model's folder" in result.stderr
    result = run_medtune("merge", "--lora_model", str(trained_adapter), "--output_dir", str(trained_adapter))
    assert result.returncode == 2 and "adapter's folder" in result.stderr


def test_merge_rejects_a_folder_that_is_not_an_adapter(glm4_dir, tmp_path):
    result = run_medtune("merge", "--lora_model", str(glm4_dir), "--output_dir", str(tmp_path / "x"))
    assert result.returncode == 2 and "no adapter_config.json" in result.stderr

"""Options that need a GPU-only package (the `gpu` extra) or a CUDA GPU: one line saying what to install, exit 2."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from medtune.config import LoraArguments
from medtune.errors import ConfigError

from .conftest import REPO, run_medtune

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")


def single_error_line(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("medtune: error:")]
    assert len(lines) == 1, result.stderr[-2000:]
    return lines[0]


@needs_no_cuda
@pytest.mark.parametrize("option", ["--load_in_4bit", "--load_in_8bit"])
def test_qlora_without_cuda_is_one_line_and_writes_nothing(option, glm4_dir, tmp_path):
    out = tmp_path / "out"
    line = single_error_line(run_medtune("sft", "--model_name_or_path", str(glm4_dir), option, "true",
                                         "--output_dir", str(out)))
    assert line.startswith(f"medtune: error: {option} (QLoRA) needs a CUDA GPU (none was found)")
    if importlib.util.find_spec("bitsandbytes") is None:
        assert "the bitsandbytes package (pip install 'medtune[gpu]' or pip install bitsandbytes)" in line
    assert not out.exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed")
def test_deepspeed_without_the_package_names_the_extra(glm4_dir, tmp_path):
    line = single_error_line(run_medtune("pt", "--model_name_or_path", str(glm4_dir), "--deepspeed",
                                         str(REPO / "configs" / "deepspeed" / "zero2.json"),
                                         "--output_dir", str(tmp_path / "out")))
    assert line == ("medtune: error: --deepspeed needs the deepspeed package, which is not installed: "
                    "pip install 'medtune[gpu]' or pip install deepspeed")


def test_each_missing_requirement_is_named_alone(monkeypatch):
    import medtune.optional

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(medtune.optional, "is_installed", lambda module: False)
    with pytest.raises(ConfigError, match=r"^--load_in_4bit \(QLoRA\) needs the bitsandbytes package \(pip"):
        LoraArguments(load_in_4bit=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(medtune.optional, "is_installed", lambda module: True)
    with pytest.raises(ConfigError, match=r"^--load_in_8bit \(QLoRA\) needs a CUDA GPU \(none was found\); "):
        LoraArguments(load_in_8bit=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert LoraArguments(load_in_4bit=True).quantization_bits == 4
    with pytest.raises(ConfigError, match="needs use_peft true"):
        LoraArguments(load_in_4bit=True, use_peft=False)
    with pytest.raises(ConfigError, match="choose one"):
        LoraArguments(load_in_4bit=True, load_in_8bit=True)


def test_qlora_loads_nf4_with_double_quantisation_in_the_training_dtype():
    from medtune.models.loader import quantization_config

    four = quantization_config(SimpleNamespace(load_in_4bit=True, load_in_8bit=False, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True), torch.bfloat16)
    assert (four.load_in_4bit, four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant,
            four.bnb_4bit_compute_dtype) == (True, "nf4", True, torch.bfloat16)
    eight = quantization_config(SimpleNamespace(load_in_4bit=False, load_in_8bit=True), torch.bfloat16)
    assert eight.load_in_8bit and not eight.load_in_4bit
    assert quantization_config(SimpleNamespace(load_in_4bit=False, load_in_8bit=False), torch.bfloat16) is None


def test_missing_liger_kernel_names_the_extra(tmp_path):
    from medtune.config import SFTTrainingArguments

    if importlib.util.find_spec("liger_kernel") is not None:
        pytest.skip("liger-kernel is installed")
    with pytest.raises(ConfigError, match=r"^--use_liger_kernel needs the liger-kernel package, which is not "
                                          r"installed: pip install 'medtune\[gpu\]' or pip install liger-kernel$"):
        SFTTrainingArguments(output_dir=str(tmp_path), use_liger_kernel=True)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_qlora_model_is_prepared_for_kbit_training(checkpointing, glm4_dir, tmp_path, monkeypatch):
    """The wiring on a CUDA machine, with bitsandbytes' loading replaced: the quantisation settings reach
    from_pretrained, and peft's k-bit preparation runs with the run's gradient-checkpointing choice."""
    import peft

    import medtune.models.loader as loader
    import medtune.optional
    from medtune.config import ModelArguments, SFTTrainingArguments
    from medtune.stages import common

    with monkeypatch.context() as cuda_machine:  # only while the options are checked
        cuda_machine.setattr(torch.cuda, "is_available", lambda: True)
        cuda_machine.setattr(medtune.optional, "is_installed", lambda module: True)
        lora_args = LoraArguments(load_in_4bit=True)
    model_args = ModelArguments(model_name_or_path=str(glm4_dir))
    training_args = SFTTrainingArguments(output_dir=str(tmp_path), gradient_checkpointing=checkpointing)
    loaded, prepared = {}, {}
    real_load = loader.load_model

    def load_model(path, quantization=None, **kwargs):
        loaded["quantization"] = quantization
        return real_load(path, **kwargs)

    def prepare(model, **kwargs):
        prepared.update(kwargs)
        return model

    monkeypatch.setattr(loader, "load_model", load_model)
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", prepare)
    common._configs_to_save[id(training_args)] = (model_args, lora_args, training_args)
    common.load_training_model(str(glm4_dir), model_args, training_args)
    assert loaded["quantization"].load_in_4bit and loaded["quantization"].bnb_4bit_quant_type == "nf4"
    assert prepared["use_gradient_checkpointing"] is checkpointing
    # --gradient_checkpointing reaches transformers 5 as activation_checkpointing, with the non-reentrant variant
    # (the reentrant one needs inputs that require grad, which a frozen base under LoRA does not give)
    assert prepared["gradient_checkpointing_kwargs"] == ({"use_reentrant": False} if checkpointing else None)
    assert training_args.activation_checkpointing is checkpointing

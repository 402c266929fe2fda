import dataclasses
from pathlib import Path

import pytest
import yaml

from medtune.config import parse_arguments
from medtune.config.loader import EFFECTIVE_CONFIG_NAME, save_effective_config
from medtune.errors import ConfigError
from medtune.stages import dpo, merge, pt, sft

REPO = Path(__file__).resolve().parents[1]


def write_yaml(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def test_yaml_fills_dataclasses_and_command_line_overrides(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"learning_rate": "3e-4", "block_size": 64, "use_peft": False,
                                               "target_modules": ["q_proj", "v_proj"], "output_dir": str(tmp_path)})
    model, lora, data, training = parse_arguments(pt.ARGUMENT_TYPES, ["--config", str(config), "--block_size", "32"])
    assert training.learning_rate == pytest.approx(3e-4)
    assert data.block_size == 32  # the command line wins over the file
    assert lora.use_peft is False
    assert lora.target_modules == ["q_proj", "v_proj"]
    assert model.trust_remote_code is False  # remote code is opt-in


def test_unknown_yaml_key_is_an_error_with_a_suggestion(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"lerning_rate": 1e-4})
    with pytest.raises(ConfigError, match=r"unknown option 'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        parse_arguments(pt.ARGUMENT_TYPES, ["--config", str(config)])


def test_unknown_command_line_option_is_an_error():
    with pytest.raises(ConfigError, match="block_sise"):
        parse_arguments(pt.ARGUMENT_TYPES, ["--block_sise", "64"])


def test_invalid_values_are_config_errors():
    with pytest.raises(ConfigError, match="remainder"):
        parse_arguments(pt.ARGUMENT_TYPES, ["--remainder", "keep"])
    with pytest.raises(ConfigError, match="torch_dtype"):
        parse_arguments(pt.ARGUMENT_TYPES, ["--torch_dtype", "fp8"])


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(config):
    import torch

    stage = {"pt": pt, "sft": sft, "dpo": dpo, "merge": merge}[config.name.split("_")[0]]
    types = stage.ARGUMENT_TYPES
    # GPU recipes ask for bf16, which TrainingArguments refuses on a CPU-only machine; every key is still checked.
    cpu_only = [] if torch.cuda.is_available() or not yaml.safe_load(config.read_text()).get("bf16") else [
        "--bf16", "false"]
    parsed = parse_arguments(types, ["--config", str(config), *cpu_only])
    assert len(parsed) == len(types)


def test_effective_config_round_trips(tmp_path):
    first = parse_arguments(pt.ARGUMENT_TYPES, ["--block_size", "48", "--learning_rate", "5e-4", "--output_dir",
                                                str(tmp_path), "--lora_rank", "4"])
    saved = save_effective_config(tmp_path, *first)
    assert saved.name == EFFECTIVE_CONFIG_NAME
    again = parse_arguments(pt.ARGUMENT_TYPES, ["--config", str(saved)])
    for a, b in zip(first, again):
        fields = [f.name for f in dataclasses.fields(a) if f.init]
        assert {k: getattr(a, k) for k in fields} == {k: getattr(b, k) for k in fields}


def test_yaml_edge_cases(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"run_name": "-exp1", "target_modules": [], "modules_to_save": None})
    _, lora, _, training = parse_arguments(pt.ARGUMENT_TYPES, ["--config", str(config), "--learning-rate", "2e-4"])
    assert training.run_name == "-exp1"
    assert lora.target_modules is None and lora.modules_to_save is None
    assert training.learning_rate == pytest.approx(2e-4)

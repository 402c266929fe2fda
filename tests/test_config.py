import dataclasses
from pathlib import Path

import pytest
import yaml

from medtune.config import parse_arguments
from medtune.config.loader import EFFECTIVE_CONFIG_NAME, save_effective_config
from medtune.errors import ConfigError
from medtune.stages import dpo, merge, pt, sft

from .conftest import run_medtune

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


# pipeline*.yaml hold one section per stage: tests/test_pipeline.py parses them
@pytest.mark.parametrize("config", sorted(c for c in (REPO / "configs").glob("*.yaml")
                                          if not c.name.startswith("pipeline")), ids=lambda p: p.name)
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


def medtune_overrides(training_class) -> dict:
    """Every Trainer option whose default medtune changes, set back to transformers' default: the values a saved
    config used to drop (equal to transformers' default) although a re-run would then use medtune's."""
    from transformers import TrainingArguments

    inherited = TrainingArguments.__dataclass_fields__
    overrides = {f.name: inherited[f.name].default for f in dataclasses.fields(training_class)
                 if f.name in inherited and f.name != "output_dir" and f.default != inherited[f.name].default}
    assert {"logging_steps", "eval_strategy", "eval_on_start", "save_total_limit", "report_to"} <= set(overrides)
    return overrides


@pytest.mark.parametrize("stage", [pt, sft, dpo], ids=["pt", "sft", "dpo"])
def test_saved_config_reproduces_every_option_medtune_overrides(tmp_path, stage):
    values = medtune_overrides(stage.ARGUMENT_TYPES[-1]) | {"output_dir": str(tmp_path), "lora_rank": 4}
    first = parse_arguments(stage.ARGUMENT_TYPES, ["--config", str(write_yaml(tmp_path / "in.yaml", values))])
    again = parse_arguments(stage.ARGUMENT_TYPES, ["--config", str(save_effective_config(tmp_path, *first))])
    for a, b in zip(first, again):
        names = [f.name for f in dataclasses.fields(a) if f.init and f.name not in ("local_rank",)]
        assert {k: getattr(a, k) for k in names} == {k: getattr(b, k) for k in names}
    training = again[-1]
    assert training.logging_steps == 500 and training.save_total_limit is None and training.report_to == []


def test_saved_config_keeps_the_preference_options(tmp_path):
    first = parse_arguments(dpo.ARGUMENT_TYPES, ["--loss_type", "simpo", "--simpo_gamma", "0.8", "--label_smoothing",
                                                 "0.1", "--truncation_mode", "keep_start", "--output_dir", str(tmp_path)])
    again = parse_arguments(dpo.ARGUMENT_TYPES, ["--config", str(save_effective_config(tmp_path, *first))])[-1]
    assert (again.loss_type, again.beta, again.simpo_gamma, again.label_smoothing, again.truncation_mode) == (
        "simpo", 2.0, 0.8, 0.1, "keep_start")


def yaml_error(tmp_path, text: str, encoding: str = "utf-8") -> str:
    config = tmp_path / "c.yaml"
    config.write_bytes(text.encode(encoding))
    with pytest.raises(ConfigError) as caught:
        parse_arguments(dpo.ARGUMENT_TYPES, ["--config", str(config)])
    return str(caught.value)


def test_yaml_mistakes_name_the_file_line_and_option(tmp_path):
    config = tmp_path / "c.yaml"
    assert yaml_error(tmp_path, "beta: 0.2\nlearning_rate: 1e-5\nbeta: 0.3\n") == (
        f"{config}:3: beta: set twice (first on line 1); keep one")
    assert yaml_error(tmp_path, "seed: 1\nlearning_rate: abc\n") == (
        f"{config}:2: learning_rate: invalid float value: 'abc'")
    assert yaml_error(tmp_path, "learning_rate:\n  - 1e-5\n  - 2e-5\n") == (
        f"{config}:1: learning_rate: expects one value, got a list")
    assert yaml_error(tmp_path, "use_peft: maybe\n").startswith(f"{config}:1: use_peft: Truthy value expected")
    assert yaml_error(tmp_path, "seed: 1\nloss_type: null\n") == (
        f"{config}:2: loss_type: needs a value (null is not allowed here)")
    assert yaml_error(tmp_path, "lerning_rate: 1\n") == (
        f"{config}:1: unknown option 'lerning_rate' (did you mean 'learning_rate'?)")
    assert yaml_error(tmp_path, "preprocessing_num_workers: 8\n").startswith(
        f"{config}:1: preprocessing_num_workers: medtune tokenizes each dataset once")


def test_a_config_not_in_utf8_is_one_line_naming_the_file(tmp_path):
    message = yaml_error(tmp_path, "# 偏好优化\nbeta: 0.1\n", encoding="gbk")
    assert message.startswith(f"{tmp_path / 'c.yaml'}:1: not UTF-8 (byte 0x") and "\n" not in message
    result = run_medtune("dpo", "--config", str(tmp_path / "c.yaml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"medtune: error: {tmp_path / 'c.yaml'}:1: not UTF-8")
    (tmp_path / "bom.yaml").write_bytes("\ufeffbeta: 0.3\n".encode())  # Windows editors add a BOM: read it
    assert parse_arguments(dpo.ARGUMENT_TYPES, ["--config", str(tmp_path / "bom.yaml")])[-1].beta == 0.3


def test_bad_command_line_values_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^command line: --learning_rate: invalid float value: 'abc'$"):
        parse_arguments(dpo.ARGUMENT_TYPES, ["--learning_rate", "abc"])


def test_yaml_null_sets_none_and_the_command_line_still_wins(tmp_path):
    config = write_yaml(tmp_path / "c.yaml", {"save_total_limit": None, "max_train_samples": None})
    training = parse_arguments(dpo.ARGUMENT_TYPES, ["--config", str(config)])[-1]
    assert training.save_total_limit is None  # medtune's default is 3
    training = parse_arguments(dpo.ARGUMENT_TYPES, ["--config", str(config), "--save_total_limit", "2"])[-1]
    assert training.save_total_limit == 2

import subprocess
import sys

import pytest

from .conftest import run_medtune


def test_help_is_instant_and_does_not_import_torch():
    code = ("import sys; from medtune.cli import main; main(['--help']); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pt " in result.stdout and "merge" in result.stdout


@pytest.mark.parametrize("command", [["pt"], ["merge"], ["init-model"], ["data", "check"], ["pipeline"]])
def test_every_command_has_help(command):
    result = run_medtune(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_pt_help_explains_options():
    result = run_medtune("pt", "--help")
    for option in ("--model_name_or_path", "--block_size", "--remainder", "--lora_rank", "--resume_from_checkpoint",
                   "--early_stopping_patience", "--config"):
        assert option in result.stdout


def test_unknown_command_and_option_exit_2():
    assert run_medtune("pretrain").returncode == 2
    result = run_medtune("pt", "--lerning_rate", "1")
    assert result.returncode == 2 and "did you mean 'learning_rate'" in result.stderr


def test_missing_model_folder_and_dpo_alias():
    result = run_medtune("sft", "--model_name_or_path", "/no/such/model", "--max_steps", "1", "--output_dir",
                         "/tmp/medtune-test-unused")
    assert result.returncode == 2 and "/no/such/model: no such model folder" in result.stderr

    from medtune.config import parse_arguments
    from medtune.stages import dpo

    assert parse_arguments(dpo.ARGUMENT_TYPES, ["--loss_type", "dpo"])[3].loss_type == "sigmoid"

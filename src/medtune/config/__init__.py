"""Typed configuration: one dataclass per concern, filled from YAML and command-line overrides."""

from medtune.config.args import (
    LoraArguments,
    MergeArguments,
    ModelArguments,
    PretrainDataArguments,
    PretrainTrainingArguments,
    StageTrainingArguments,
)
from medtune.config.loader import parse_arguments, save_effective_config

__all__ = [
    "LoraArguments",
    "MergeArguments",
    "ModelArguments",
    "PretrainDataArguments",
    "PretrainTrainingArguments",
    "StageTrainingArguments",
    "parse_arguments",
    "save_effective_config",
]

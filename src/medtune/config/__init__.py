"""Typed configuration: one dataclass per concern, filled from YAML and command-line overrides."""

from medtune.config.args import (
    AdapterArguments,
    BackendArguments,
    DataArguments,
    DPOTrainingArguments,
    EvalArguments,
    LoraArguments,
    MergeArguments,
    ModelArguments,
    PreferenceDataArguments,
    PretrainDataArguments,
    PretrainTrainingArguments,
    ServeArguments,
    SFTDataArguments,
    SFTTrainingArguments,
    StageTrainingArguments,
)
from medtune.config.loader import parse_arguments, save_effective_config

__all__ = [
    "AdapterArguments",
    "BackendArguments",
    "ServeArguments",
    "EvalArguments",
    "DPOTrainingArguments",
    "PreferenceDataArguments",
    "DataArguments",
    "SFTDataArguments",
    "SFTTrainingArguments",
    "LoraArguments",
    "MergeArguments",
    "ModelArguments",
    "PretrainDataArguments",
    "PretrainTrainingArguments",
    "StageTrainingArguments",
    "parse_arguments",
    "save_effective_config",
]

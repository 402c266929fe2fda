"""Typed configuration: one dataclass per concern, filled from YAML and command-line overrides."""

from medtune.config.args import (
    AdapterArguments,
    ChatArguments,
    DataArguments,
    DPOTrainingArguments,
    EvalArguments,
    GenerationArguments,
    LoraArguments,
    MergeArguments,
    ModelArguments,
    PredictArguments,
    PreferenceDataArguments,
    PretrainDataArguments,
    PretrainTrainingArguments,
    SFTDataArguments,
    SFTTrainingArguments,
    StageTrainingArguments,
)
from medtune.config.loader import parse_arguments, save_effective_config

__all__ = [
    "AdapterArguments",
    "ChatArguments",
    "GenerationArguments",
    "PredictArguments",
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

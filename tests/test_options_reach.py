"""Every option medtune declares reaches the code of every command that accepts it: none is accepted and ignored.

The walk reads each command's own modules for `<something>_args.<option>`; the options whose effect is a check at
parse time are listed with the test that shows the effect. A new option that nothing reads fails here.
"""

import dataclasses
import re
import shutil
from pathlib import Path

import pytest
from transformers import TrainingArguments

from medtune.config import (
    AdapterArguments,
    ChatArguments,
    EvalArguments,
    GenerationArguments,
    MergeArguments,
    ModelArguments,
    PredictArguments,
    parse_arguments,
)
from medtune.errors import ConfigError
from medtune.stages import dpo, pt, sft

SRC = Path(__file__).resolve().parents[1] / "src" / "medtune"
COMMON = ["stages/common.py", "models/loader.py"]
# command -> (the dataclasses it parses, the modules that act on them)
COMMANDS = {
    "pt": (pt.ARGUMENT_TYPES, ["stages/pt.py", "data/pretrain.py", "data/blocks.py", "stages/logprobs.py", *COMMON]),
    "sft": (sft.ARGUMENT_TYPES, ["stages/sft.py", "data/sft.py", "stages/logprobs.py", *COMMON]),
    "dpo": (dpo.ARGUMENT_TYPES, ["stages/dpo.py", "data/preference.py", *COMMON]),
    "eval": ((ModelArguments, EvalArguments), ["eval/*.py", "models/loader.py"]),
    "merge": ((ModelArguments, MergeArguments), ["stages/merge.py", "models/loader.py"]),
    "chat": ((ModelArguments, AdapterArguments, GenerationArguments, ChatArguments),
             ["serve/chat.py", "eval/backends.py", "models/loader.py"]),
    "predict": ((ModelArguments, AdapterArguments, GenerationArguments, PredictArguments),
                ["serve/predict.py", "eval/backends.py", "models/loader.py"]),
}
# Options consumed while the options are parsed, each with the test below that shows its effect.
CHECKED_WHEN_PARSED = {"model_type": "test_model_type_refuses_a_model_of_another_family"}


def declared_options(dataclass_types) -> list[str]:
    """medtune's own options: everything but the Trainer options inherited unchanged from transformers (which
    the Trainer itself consumes)."""
    inherited = TrainingArguments.__dataclass_fields__
    return [f.name for dc in dataclass_types for f in dataclasses.fields(dc)
            if f.init and (f.name not in inherited or f.name == "resume_from_checkpoint")]


def consumer_source(patterns: list[str]) -> str:
    return "\n".join(path.read_text(encoding="utf-8") for pattern in patterns for path in sorted(SRC.glob(pattern)))


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_declared_option_is_read_by_its_command(command):
    dataclass_types, modules = COMMANDS[command]
    source = consumer_source(modules)
    ignored = [name for name in declared_options(dataclass_types)
               if name not in CHECKED_WHEN_PARSED and not re.search(rf"\w*args\.{name}\b", source)]
    assert ignored == [], f"`medtune {command}` accepts but never reads: {', '.join(ignored)}"


def test_model_type_refuses_a_model_of_another_family(tiny_model):
    glm4, qwen = str(tiny_model("glm4")), str(tiny_model("qwen2"))
    with pytest.raises(ConfigError, match=r"model_type='qwen', but .*config.json says model_type 'glm'"):
        parse_arguments(sft.ARGUMENT_TYPES, ["--model_name_or_path", glm4, "--model_type", "qwen"])
    with pytest.raises(ConfigError, match="model_type 'qwen2'"):
        parse_arguments((ModelArguments, EvalArguments), ["--model", qwen, "--model_type", "chatglm"])
    for path, family in ((glm4, "chatglm"), (glm4, "glm4"), (qwen, "qwen"), (qwen, "auto")):  # the book's names
        assert parse_arguments(dpo.ARGUMENT_TYPES, ["--model", path, "--model_type", family])[0].model_type == family


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_eval_loads_the_model_with_the_requested_attention(glm4_dir, attention):
    from medtune.eval.runner import make_backend

    model_args, eval_args = parse_arguments((ModelArguments, EvalArguments), [
        "--model", str(glm4_dir), "--attn_implementation", attention])
    assert make_backend(model_args, eval_args).model.config._attn_implementation == attention


def test_eval_loads_the_tokenizer_it_is_given(glm4_dir, tmp_path):
    from medtune.eval.runner import make_backend

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (glm4_dir / name).is_file():
            shutil.copy(glm4_dir / name, tokenizer_dir / name)
    model_args, eval_args = parse_arguments((ModelArguments, EvalArguments), [
        "--model", str(glm4_dir), "--tokenizer_name_or_path", str(tokenizer_dir)])
    assert make_backend(model_args, eval_args).tokenizer.name_or_path == str(tokenizer_dir)


def test_the_book_option_preprocessing_num_workers_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="preprocessing_num_workers: medtune tokenizes each dataset once"):
        parse_arguments(pt.ARGUMENT_TYPES, ["--preprocessing_num_workers", "8"])

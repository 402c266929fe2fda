"""Fill configuration dataclasses from a YAML file plus command-line overrides.

`medtune pt --config configs/pt_tiny.yaml --learning_rate 1e-4`: the YAML values are turned into command-line
tokens placed before the user's own, so both go through the same typed parsing and the command line wins.
Unknown keys, in the YAML or on the command line, are errors that suggest the closest known name.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from medtune.errors import ConfigError

EFFECTIVE_CONFIG_NAME = "medtune_config.yaml"
# TrainingArguments fields that are runtime plumbing or secrets, never worth writing back into a config file.
_NOT_SAVED = {"local_rank", "hub_token", "deepspeed_plugin"}


def _field_names(dataclass_types) -> list[str]:
    return [f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init]


def _aliases(dataclass_types) -> set[str]:
    """Short command-line names declared in field metadata (e.g. --model for --model_name_or_path)."""
    return {alias.lstrip("-") for dc in dataclass_types for f in dataclasses.fields(dc)
            for alias in f.metadata.get("aliases", [])}


def _unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown option {key!r}{hint}")


def _yaml_to_tokens(path: Path, known: list[str]) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    tokens: list[str] = []
    for key, value in values.items():
        if key not in known:
            raise _unknown_key_error(str(key), known, str(path))
        if value is None or value == []:
            continue  # null or an empty list: keep the default
        if isinstance(value, (list, tuple)):
            tokens.append(f"--{key}")
            tokens.extend(str(v) for v in value)
            continue
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, dict):
            text = json.dumps(value)
        else:
            text = str(value)
        tokens.append(f"--{key}={text}")  # one token, so a value starting with '-' is not taken for an option
    return tokens


def _split_config_flag(argv: list[str]) -> tuple[Path | None, list[str]]:
    rest, config = [], None
    it = iter(argv)
    for token in it:
        if token == "--config":
            config = next(it, None)
            if config is None:
                raise ConfigError("--config needs a YAML file path")
        elif token.startswith("--config="):
            config = token.split("=", 1)[1]
        else:
            rest.append(token)
    return (Path(config) if config else None), rest


def build_parser(dataclass_types, prog: str, description: str) -> HfArgumentParser:
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
    parser.add_argument_group("config file").add_argument(
        "--config", metavar="YAML", help="YAML file of option: value pairs; command-line options override it."
    )
    return parser


def parse_arguments(dataclass_types, argv: list[str], prog: str = "medtune", description: str = "") -> tuple:
    """Return one instance per dataclass type, filled from `--config YAML` and the rest of `argv`."""
    dataclass_types = list(dataclass_types)
    known = _field_names(dataclass_types)
    config_path, rest = _split_config_flag(list(argv))
    tokens = _yaml_to_tokens(config_path, known) if config_path else []
    aliases = _aliases(dataclass_types)
    for token in rest:
        if token.startswith("--") and token not in ("--help",):
            name = token[2:].split("=", 1)[0].replace("-", "_")  # --learning-rate works as in HfArgumentParser
            if name not in known and name not in aliases and not (name.startswith("no_") and name[3:] in known):
                raise _unknown_key_error(name, known, "command line")
    parser = build_parser(dataclass_types, prog, description)
    try:
        namespace, remaining = parser.parse_known_args(tokens + rest)
    except SystemExit:
        raise
    if remaining:
        raise ConfigError(f"command line: unexpected arguments {' '.join(remaining)}")
    values = vars(namespace)
    values.pop("config", None)
    instances = []
    for dc in dataclass_types:
        names = {f.name for f in dataclasses.fields(dc) if f.init}
        kwargs = {k: v for k, v in values.items() if k in names}
        try:
            instances.append(dc(**kwargs))
        except ConfigError:
            raise
        except (ValueError, TypeError) as exc:
            # TrainingArguments validates in __post_init__ with ValueError; show it as a config problem.
            raise ConfigError(str(exc).strip().splitlines()[0]) from None
    return tuple(instances)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def effective_config(*instances) -> dict[str, Any]:
    """The options that matter: every medtune option, plus Trainer options that differ from their defaults."""
    from transformers import TrainingArguments

    defaults = TrainingArguments(output_dir="unused")
    config: dict[str, Any] = {}
    for instance in instances:
        for f in dataclasses.fields(instance):
            if not f.init or f.name in _NOT_SAVED:
                continue
            value = _plain(getattr(instance, f.name))
            inherited = isinstance(instance, TrainingArguments) and f.name in TrainingArguments.__dataclass_fields__
            if inherited and f.name != "output_dir" and value == _plain(getattr(defaults, f.name, object())):
                continue
            config[f.name] = value
    return config


def save_effective_config(output_dir: str | Path, *instances) -> Path:
    """Write the run's effective options as YAML that `--config` accepts back."""
    path = Path(output_dir) / EFFECTIVE_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(effective_config(*instances), allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path

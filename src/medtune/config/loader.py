"""Fill configuration dataclasses from a YAML file plus command-line overrides.

`medtune pt --config configs/pt_tiny.yaml --learning_rate 1e-4`: the YAML values are turned into command-line
tokens placed before the user's own, so both go through the same typed parsing and the command line wins.
Unknown keys, in the YAML or on the command line, are errors that suggest the closest known name; each YAML value is
checked on its own first, so a duplicated key, a value of the wrong type or a list where one value belongs is
reported with the file, line and option.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import enum
import functools
import json
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from medtune.errors import ConfigError

EFFECTIVE_CONFIG_NAME = "medtune_config.yaml"
# TrainingArguments fields that are runtime plumbing or secrets, never worth writing back into a config file.
_NOT_SAVED = {"local_rank", "hub_token", "deepspeed_plugin"}


# Names from the book's scripts that medtune does not take, with the reason (instead of a bare "unknown option").
_REMOVED = {
    "preprocessing_num_workers": "medtune tokenizes each dataset once and caches it (torchrun ranks and re-runs load "
                                 "the cache), so there is no tokenization pool to size; remove the option",
}


def _field_names(dataclass_types) -> list[str]:
    return [f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init]


def _aliases(dataclass_types) -> set[str]:
    """Short command-line names declared in field metadata (e.g. --model for --model_name_or_path)."""
    return {alias.lstrip("-") for dc in dataclass_types for f in dataclasses.fields(dc)
            for alias in f.metadata.get("aliases", [])}


def _optional_fields(dataclass_types) -> set[str]:
    """Fields that accept None (a YAML `null`)."""
    names = set()
    for dc in dataclass_types:
        for name, hint in typing.get_type_hints(dc).items():
            if type(None) in typing.get_args(hint):
                names.add(name)
    return names


def unknown_key_error(key: str, known: list[str], where: str) -> ConfigError:
    if key in _REMOVED:
        return ConfigError(f"{where}: {key}: {_REMOVED[key]}")
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ConfigError(f"{where}: unknown option {key!r}{hint}")


def read_yaml_entries(path: Path, sections: tuple[str, ...] = ()) -> list[tuple[str, Any, int]]:
    """(key, value, line) for every top-level entry of a YAML mapping; a key given twice is an error, not a silent
    "the later one wins". The value of a key named in `sections` must be a mapping and comes back as its own
    (key, value, line) entries, so options inside a section are located by line too."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{raw[exc.start]:02x}); re-save the config as "
                          "UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return []
        entries = []
        for key, value_node, line in _mapping_entries(loader, root, path):
            if key in sections and value_node.tag != "tag:yaml.org,2002:null":
                value = _mapping_entries(loader, value_node, path, key)
                value = [(k, loader.construct_object(v, deep=True), n) for k, v, n in value]
            else:
                value = loader.construct_object(value_node, deep=True)
            entries.append((key, value, line))
        return entries
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    finally:
        loader.dispose()


def _mapping_entries(loader, node, path: Path, section: str | None = None) -> list[tuple[str, Any, int]]:
    """(key, value node, line) of a YAML mapping node, refusing a key given twice."""
    where = f": {section}" if section else ""
    if not isinstance(node, yaml.MappingNode):
        at = f"{path}:{node.start_mark.line + 1}: {section}" if section else str(path)
        raise ConfigError(f"{at}: expected a mapping of option: value")
    entries, first_line = [], {}
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = str(loader.construct_object(key_node, deep=True))
        if key in first_line:
            raise ConfigError(f"{path}:{line}{where}: {key}: set twice (first on line {first_line[key]}); keep one")
        first_line[key] = line
        entries.append((key, value_node, line))
    return entries


def _value_tokens(key: str, value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [f"--{key}", *(str(v) for v in value)] if value else []  # an empty list keeps the default
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, dict):
        text = json.dumps(value)
    else:
        text = str(value)
    return [f"--{key}={text}"]  # one token, so a value starting with '-' is not taken for an option


@contextlib.contextmanager
def _nothing_required(parser: argparse.ArgumentParser):
    """Check one config entry on its own: options marked required are not required while it is parsed."""
    required = [action for action in parser._actions if action.required]
    for action in required:
        action.required = False
    try:
        yield
    finally:
        for action in required:
            action.required = True


def _yaml_to_tokens(entries: list[tuple[str, Any, str]], dataclass_types,
                    parser: HfArgumentParser) -> tuple[list[str], dict[str, None]]:
    """Command-line tokens for a config's (key, value, where) entries, each checked on its own so a bad value is
    reported with its file, line and option; and the options the config sets to null."""
    known = _field_names(dataclass_types)
    optional = _optional_fields(dataclass_types)
    tokens: list[str] = []
    nulls: dict[str, None] = {}
    for key, value, where in entries:
        if key not in known:
            raise unknown_key_error(key, known, where)
        if value is None:
            if key not in optional:
                raise ConfigError(f"{where}: {key}: needs a value (null is not allowed here)")
            nulls[key] = None
            continue
        # argparse keeps no public map from option to action; nargs says whether the option takes a list
        takes_list = parser._option_string_actions[f"--{key}"].nargs in ("+", "*")
        if isinstance(value, (list, tuple)) and not takes_list:
            raise ConfigError(f"{where}: {key}: expects one value, got a list")
        entry = _value_tokens(key, value)
        try:
            with _nothing_required(parser):  # a required option set on the command line is absent from `entry`
                _, left = parser.parse_known_args(entry)
        except argparse.ArgumentError as exc:
            raise ConfigError(f"{where}: {key}: {exc.message}") from None
        if left:
            raise ConfigError(f"{where}: {key}: unexpected value {' '.join(left)}")
        tokens += entry
    return tokens, nulls


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
    # exit_on_error=False: a bad value raises, and becomes one `medtune: error:` line naming the option.
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description, exit_on_error=False)
    parser.add_argument_group("config file").add_argument(
        "--config", metavar="YAML", help="YAML file of option: value pairs; command-line options override it."
    )
    return parser


def parse_arguments(dataclass_types, argv: list[str], prog: str = "medtune", description: str = "",
                    config_entries: list[tuple[str, Any, str]] | None = None) -> tuple:
    """Return one instance per dataclass type, filled from `--config YAML` (or `config_entries`, (key, value, where)
    triples such as one section of a pipeline file) and the rest of `argv`."""
    dataclass_types = list(dataclass_types)
    known = _field_names(dataclass_types)
    config_path, rest = _split_config_flag(list(argv))
    aliases = _aliases(dataclass_types)
    for token in rest:
        if token.startswith("--") and token not in ("--help",):
            name = token[2:].split("=", 1)[0].replace("-", "_")  # --learning-rate works as in HfArgumentParser
            if name not in known and name not in aliases and not (name.startswith("no_") and name[3:] in known):
                raise unknown_key_error(name, known, "command line")
    parser = build_parser(dataclass_types, prog, description)
    if config_path:
        config_entries = [(key, value, f"{config_path}:{line}") for key, value, line in read_yaml_entries(config_path)]
    tokens, nulls = _yaml_to_tokens(config_entries or [], dataclass_types, parser)
    parser.set_defaults(**nulls)  # a YAML null sets None; the command line still wins
    try:
        namespace, remaining = parser.parse_known_args(tokens + rest)
    except argparse.ArgumentError as exc:
        name = f"{exc.argument_name.split('/')[0]}: " if exc.argument_name else ""
        raise ConfigError(f"command line: {name}{exc.message}") from None
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


@functools.cache
def _class_defaults(cls) -> dict[str, Any]:
    """Every option's default as that class declares it (medtune's defaults, not transformers')."""
    return {name: _plain(value) for name, value in _saved_values(cls()).items()}


def _saved_values(instance) -> dict[str, Any]:
    values = {}
    for f in dataclasses.fields(instance):
        if f.init and f.name not in _NOT_SAVED:
            value = _plain(getattr(instance, f.name))
            if f.name == "report_to" and isinstance(value, list):
                value = ",".join(value) or "none"  # the command line takes one string: "none", "all" or a list
            values[f.name] = value
    return values


def effective_config(*instances) -> dict[str, Any]:
    """The options that matter: every medtune option, plus Trainer options that differ from the stage's defaults.

    Trainer options are compared with the defaults of the stage's own class (medtune's), not transformers': a value
    equal to transformers' default but not to medtune's is exactly one that a re-run would otherwise lose."""
    from transformers import TrainingArguments

    config: dict[str, Any] = {}
    for instance in instances:
        values = _saved_values(instance)
        if isinstance(instance, TrainingArguments):
            defaults = _class_defaults(type(instance))
            values = {name: value for name, value in values.items()
                      if name == "output_dir" or name not in TrainingArguments.__dataclass_fields__
                      or value != defaults.get(name, object())}
        config.update(values)
    return config


def save_effective_config(output_dir: str | Path, *instances) -> Path:
    """Write the run's effective options as YAML that `--config` accepts back."""
    path = Path(output_dir) / EFFECTIVE_CONFIG_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(effective_config(*instances), allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path

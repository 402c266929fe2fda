"""Where the data commands write: output paths checked before any work, and input files mirrored under an output
folder (`data scrub --output_dir`, `data contamination --write_clean`).

Every check raises `ConfigError` (one line, exit code 2) before a record is read, so a bad path never costs a long
run, never leaves half-written output and never shows a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

from medtune.errors import ConfigError


def check_output_file(path: str | Path, option: str) -> Path:
    """A file to (over)write: not a folder, and its parent is a folder or can become one."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    for parent in target.resolve().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
            break
    return target


def check_output_dir(path: str | Path, option: str, inputs: list[str], must_be_empty: bool = False) -> Path:
    """A folder to write into: not a file, not inside any input nor holding one (a second run would read its own
    output, or overwrite the input), and with `must_be_empty` new or empty."""
    target = Path(path).expanduser()
    resolved = target.resolve()
    if resolved.exists() and not resolved.is_dir():
        raise ConfigError(f"{option} {path}: is a file; give a folder")
    for parent in resolved.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"{option} {path}: {parent} is a file, not a folder")
            break
    for location in inputs:
        source = Path(location).expanduser().resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ConfigError(f"{option} {path}: must be outside the input data ({location})")
    if must_be_empty and resolved.exists() and any(resolved.iterdir()):
        raise ConfigError(f"{option} {path}: exists and is not an empty folder; choose a new folder")
    return target


def mirror_base(locations: list[str]) -> Path:
    """The folder whose layout an output folder mirrors: the one folder given, else the deepest folder holding
    every input (so `data/pretrain data/finetune` keeps `pretrain/` and `finetune/`, and two files named
    train.txt in different folders keep their folders)."""
    paths = [Path(p).expanduser().resolve() for p in locations]
    if len(paths) == 1 and paths[0].is_dir():
        return paths[0]
    return Path(os.path.commonpath([p if p.is_dir() else p.parent for p in paths]))


def mirrored(files: list[Path], locations: list[str], output_dir: Path) -> list[tuple[Path, Path]]:
    """(input file, its place under `output_dir`) for every file found under `locations`."""
    base = mirror_base(locations)
    return [(path, output_dir / path.resolve().relative_to(base)) for path in files]


def remove_quietly(path: Path) -> None:
    """Cleanup after a failed run: never raises, so it cannot hide the error that stopped the run."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass

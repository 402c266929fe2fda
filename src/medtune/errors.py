"""Errors meant for users: the CLI prints them as one line each and exits with code 2, without a traceback.

Anything else that escapes is a bug in medtune and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class MedtuneError(Exception):
    """A problem with the user's input or configuration, with a message that says what to do."""

    exit_code = 2


class ConfigError(MedtuneError):
    """An unknown, mistyped or inconsistent configuration value."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one record: `path:line: field: message`."""

    path: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class DataError(MedtuneError):
    """One or more malformed records; raised before any training starts."""

    def __init__(self, problems: list[Problem], limit: int = 50):
        self.problems = list(problems)
        lines = [str(p) for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"... and {len(self.problems) - limit} more problems (run `medtune data check` to list all)")
        super().__init__("\n".join(lines))

"""Errors meant for users: the CLI prints them as one line each and exits with code 2, without a traceback.

Anything else that escapes is a bug in medtune and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


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


# -- a full disk ----------------------------------------------------------------------------------------------------

def is_disk_full(exc: BaseException) -> bool:
    """A full disk however it is reported: an OSError ENOSPC, or a library's own exception carrying the OS message
    (safetensors raises SafetensorError "... No space left on device (os error 28)" / "kind: StorageFull")."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return "No space left on device" in str(exc) or "StorageFull" in str(exc)


def file_named_by(exc: BaseException, fallback: str | Path) -> str:
    """The file a failed write names (an OSError carries it; SafetensorError does not), else `fallback`."""
    return str(getattr(exc, "filename", None) or fallback)


def byte_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def free_space(path: Path) -> int:
    """Free bytes on the disk that holds `path`, or would hold it once created."""
    return shutil.disk_usage(next(p for p in (path, *path.parents) if p.exists())).free


@contextlib.contextmanager
def failed_write_reported(describe: Callable[[BaseException], str], any_os_error: bool = False):
    """A full disk while writing (with `any_os_error` any OSError: a folder not writable, ...) becomes one line,
    `describe(exc)`: the user's environment, not a bug, so no traceback. The caller removes what the failed write
    left, in `describe` (the training stages' `disk_full_reported`) or in its own `except` around the block (merge,
    whose `describe` only words the line). A MedtuneError raised inside passes through untouched: it already is one
    line."""
    try:
        yield
    except MedtuneError:
        raise
    except Exception as exc:
        if not (is_disk_full(exc) or (any_os_error and isinstance(exc, OSError))):
            raise
        raise MedtuneError(describe(exc)) from None

"""`pipeline_state.json`: per step, the record it ran with (effective options, sha256 of every input file, the
models it read), whether it finished, its wall time and peak memory. A re-run compares records to decide what to
skip, resume or run again, and says why."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from medtune.errors import ConfigError
from medtune.pipeline.config import STEPS

logger = logging.getLogger(__name__)

STATE_FILE = "pipeline_state.json"
# The folder each step writes; eval's is kept when the step runs again: `medtune eval` reuses the answers of a
# model whose weights (fingerprint) and options are unchanged, and sets the others aside itself.
FOLDERS = {"scrub": "scrubbed", "contamination": "contamination", "pt": "pt", "merge-pt": "merged-pt", "sft": "sft", "merge-sft": "merged-sft", "dpo": "dpo",
           "merge-dpo": "merged-dpo", "eval": "eval"}
KEPT_ON_RERUN = {"eval"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def comparable(record: dict) -> dict:
    """The record as steps are compared: an option that is None (unset) counts as absent, so an option added to
    medtune after a step ran (recorded by newer code as None) does not make a finished step run again."""
    options = {key: value for key, value in record.get("options", {}).items() if value is not None}
    return {**record, "options": options} if "options" in record else record


def describe_changes(previous: dict, current: dict) -> str:
    """'learning_rate 0.002 -> 0.0001; data/a.txt changed' -- why a finished step must run again."""
    reasons = []
    for section, what in (("options", "option"), ("inputs", "data file"), ("models", "model")):
        before, after = previous.get(section, {}), current.get(section, {})
        for key in sorted(set(before) | set(after)):
            if key not in after:
                reasons.append(f"{what} {key} removed")
            elif key not in before:
                reasons.append(f"{key} set to {after[key]!r}" if section == "options" else f"{what} {key} added")
            elif before[key] != after[key]:
                reasons.append(f"{key} {before[key]!r} -> {after[key]!r}" if section == "options"
                               else f"{key} changed" if section == "inputs" else f"model {key} changed")
    known = {"options", "inputs", "models"}
    for key in sorted((set(previous) | set(current)) - known):
        if previous.get(key) != current.get(key):
            reasons.append(f"{key} changed")
    return "; ".join(reasons) or "settings changed"


def peak_rss_reset() -> None:
    """Start a new peak-memory window (Linux: writing 5 to clear_refs resets VmHWM, the process's peak RSS)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory since peak_rss_reset (Linux VmHWM); elsewhere the process's peak so far (ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class PipelineState:
    """Per step: {"record", "finished", "wall_s", "peak_rss_mb"} (+ what the step wants kept, e.g. its data summary)."""

    def __init__(self, out: Path, progress=None):
        self.path = out / STATE_FILE
        self.out = out
        self.progress = progress
        self.steps: dict[str, dict] = {}
        self.invalidated_by: dict[str, str] = {}  # step -> why its record was forgotten (an earlier step re-ran)
        if self.path.is_file():
            try:
                self.steps = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("%s is unreadable (cut by a kill?): every step runs again", self.path)
                self.forget_from(STEPS[0])
        else:
            self._refuse_unrecorded_folders()

    def _refuse_unrecorded_folders(self) -> None:
        """Step folders with no record were not made by this pipeline: never delete or reuse them."""
        for name in FOLDERS.values():
            folder = self.out / name
            if folder.is_dir() and any(folder.iterdir()):
                raise ConfigError(f"{folder} exists but {self.path} does not record how it was made; choose a new "
                                  "--output_dir (or delete that folder)")

    def folder(self, name: str) -> Path:
        return self.out / FOLDERS[name]

    def reason_to_run(self, name: str, record: dict) -> str | None:
        """None when the step finished with exactly this record; otherwise why it (re-)runs."""
        previous = self.steps.get(name)
        if previous is None:
            cause = self.invalidated_by.get(name)
            return cause or "first run"
        if comparable(previous["record"]) != comparable(record):
            return describe_changes(previous["record"], record)
        return None if previous["finished"] else "interrupted"

    def holds_progress(self) -> bool:
        """Whether anything here is worth keeping for a resume: a finished step or a training checkpoint."""
        finished = any(step["finished"] for step in self.steps.values())
        return finished or any(self.out.glob("*/checkpoint-*"))

    def run(self, name: str, record: dict, work: Callable[[], dict | None], resumable: bool,
            invalidates_later: bool = True) -> bool:
        """Run `work` as step `name` unless it already finished with this record (returns whether it ran). An
        interrupted step resumes when `resumable` (training continues from its last checkpoint); anything else
        starts from scratch. What `work` returns is kept in the step's entry. A step whose output every later step
        records by content (`invalidates_later=False`) leaves them to compare their own records."""
        reason = self.reason_to_run(name, record)
        if reason is None:
            logger.info("%s: already finished in %s with the same options and data, skipping", name,
                        self.folder(name))
            if self.progress:
                self.progress.skipped(name)
            return False
        resume = resumable and reason == "interrupted"
        if reason == "interrupted":
            logger.warning("%s: %s was left incomplete by an interrupted run; %s", name, self.folder(name),
                           "resuming from its last checkpoint" if resume else "running it again")
        elif reason != "first run":
            logger.warning("%s: running again from scratch (%s); later stages follow", name, reason)
        if not resume:
            self.forget_from(name) if invalidates_later else self.forget(name)
        self.steps[name] = {"record": record, "finished": False}
        self._save()
        if self.progress:
            self.progress.started(name)
        peak_rss_reset()
        started = time.perf_counter()
        kept = work() or {}
        wall = time.perf_counter() - started
        self.steps[name].update(kept, finished=True, wall_s=round(wall, 2), peak_rss_mb=round(peak_rss_mb(), 1))
        self._save()
        if self.progress:
            self.progress.finished(name, wall)
        return True

    def forget_from(self, name: str, why: str | None = None) -> None:
        """Delete the output of step `name` and of every later step: they were made from other inputs. `why` says
        so in their log lines (default: step `name` ran again)."""
        for later in STEPS[STEPS.index(name):]:
            if later not in KEPT_ON_RERUN:
                shutil.rmtree(self.folder(later), ignore_errors=True)
            if self.steps.pop(later, None) is not None and (later != name or why):
                self.invalidated_by[later] = why or f"{name} ran again"
        self._save()

    def forget(self, name: str) -> None:
        shutil.rmtree(self.folder(name), ignore_errors=True)
        self.steps.pop(name, None)
        self._save()

    def _save(self) -> None:
        from medtune.data.resume import write_atomically

        self.out.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(self.steps, indent=2, ensure_ascii=False).encode("utf-8"))


class Progress:
    """One log line per step start and finish, with the pipeline's elapsed time and an ETA.

    The ETA prices each remaining step in rough work units (training: optimizer steps x batch size; a merge and
    each model's evaluation: fixed amounts) at the seconds per unit this run has measured so far."""

    def __init__(self, units: dict[str, float]):
        self.units = units  # step -> work units, for the steps this run may execute, in order
        self.started_at = time.perf_counter()
        self.done: set[str] = set()
        self.spent_units = 0.0
        self.spent_seconds = 0.0

    def _position(self, name: str) -> str:
        order = list(self.units)
        return f"[{order.index(name) + 1}/{len(order)}]" if name in order else ""

    def _elapsed(self) -> str:
        return duration(time.perf_counter() - self.started_at)

    def started(self, name: str) -> None:
        logger.info("%s %s: started (pipeline elapsed %s)", self._position(name), name, self._elapsed())

    def skipped(self, name: str) -> None:
        self.done.add(name)

    def finished(self, name: str, seconds: float) -> None:
        self.done.add(name)
        self.spent_units += self.units.get(name, 0.0)
        self.spent_seconds += seconds
        remaining = sum(u for step, u in self.units.items() if step not in self.done)
        eta = (f"ETA {duration(remaining * self.spent_seconds / self.spent_units)}" if self.spent_units and remaining
               else "nothing left" if not remaining else "ETA unknown")
        logger.info("%s %s: finished in %s (pipeline elapsed %s, %s)", self._position(name), name, duration(seconds),
                    self._elapsed(), eta)


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"

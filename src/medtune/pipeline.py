"""`medtune pipeline`: the whole path on one command, each stage reading the previous stage's output.

Today: continued pretraining -> merge -> report. Re-running the same command resumes: finished stages are
skipped, an interrupted training stage continues from its last checkpoint, an interrupted merge is redone.

Each stage's record -- its effective options and the sha256 of every input data file -- is kept in
`pipeline_state.json`, with whether the stage finished. A re-run whose options or data differ from the record
re-runs that stage from scratch and every stage after it, and says which option or file changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from medtune.errors import ConfigError, MedtuneError
from medtune.paths import bundled_config, bundled_data_dir

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune pipeline",
        description="Continued pretraining then merge, with a markdown report. Without options it runs the "
                    "embedded tiny GLM-4 model on the bundled corpus. Extra options (e.g. --learning_rate 1e-4) "
                    "go to the pt stage. Re-running the same command resumes; a stage whose options or data files "
                    "changed runs again, with every stage after it, and the log says what changed.",
    )
    parser.add_argument("--output_dir", default="outputs/pipeline", help="Folder for every stage's output.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model (default: the embedded tiny GLM-4).")
    parser.add_argument("--pt_config", default=str(bundled_config("pt_tiny.yaml")), help="YAML for the pt stage.")
    return parser


STATE_FILE = "pipeline_state.json"
STAGES = ("pt", "merged")  # stage folders in run order; a stage that re-runs invalidates every later one
# Options the pipeline itself sets, or that cannot change a stage's result.
NOT_COMPARED = {"resume_from_checkpoint", "output_dir"}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_digests(*locations) -> dict[str, str]:
    """sha256 of every data file under `locations` (files or folders), keyed by path."""
    from medtune.data.loading import KIND_SUFFIXES
    from medtune.data.readers import list_data_files

    return {str(path): file_sha256(path) for location in locations if location
            for path in list_data_files(location, KIND_SUFFIXES["text"])}


def pt_record(configs: tuple) -> dict:
    """What the pt stage's result depends on: its effective options and the content of its data files."""
    from medtune.config.loader import effective_config

    options = {k: v for k, v in effective_config(*configs).items() if k not in NOT_COMPARED}
    data_args = configs[2]
    inputs = data_digests(data_args.train_file_dir or bundled_data_dir("pretrain"), data_args.validation_file_dir)
    return json.loads(json.dumps({"options": options, "inputs": inputs}, default=str))


def describe_changes(previous: dict, current: dict) -> str:
    """'learning_rate 0.002 -> 0.0001; data/a.txt changed' -- why a finished stage must run again."""
    reasons = []
    for section, what in (("options", "option"), ("inputs", "data file")):
        before, after = previous.get(section, {}), current.get(section, {})
        for key in sorted(set(before) | set(after)):
            if key not in after:
                reasons.append(f"{what} {key} removed")
            elif key not in before:
                reasons.append(f"{what} {key} added" if section == "inputs" else f"{key} set to {after[key]!r}")
            elif before[key] != after[key]:
                reasons.append(f"{key} changed" if section == "inputs" else f"{key} {before[key]!r} -> {after[key]!r}")
    for key in sorted(set(previous) - {"options", "inputs"} | set(current) - {"options", "inputs"}):
        if previous.get(key) != current.get(key):
            reasons.append(f"{key} changed")
    return "; ".join(reasons) or "settings changed"


class PipelineState:
    """`pipeline_state.json`: per stage, the record it ran with and whether it finished (the completion marker)."""

    def __init__(self, out: Path):
        self.path = out / STATE_FILE
        self.out = out
        self.stages: dict[str, dict] = {}
        if self.path.is_file():
            try:
                self.stages = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                logger.warning("%s is unreadable (cut by a kill?): every stage runs again", self.path)
                self.forget_from(STAGES[0])
        else:
            self._refuse_unrecorded_folders()

    def _refuse_unrecorded_folders(self) -> None:
        """Stage folders with no record were not made by this pipeline version: never delete or reuse them."""
        for name in STAGES:
            folder = self.out / name
            if folder.is_dir() and any(folder.iterdir()):
                raise ConfigError(f"{folder} exists but {self.path} does not record how it was made; choose a new "
                                  "--output_dir (or delete that folder)")

    def reason_to_run(self, name: str, record: dict) -> str | None:
        """None when the stage finished with exactly this record; otherwise why it (re-)runs."""
        previous = self.stages.get(name)
        if previous is None:
            return "first run"
        if previous["record"] != record:
            return describe_changes(previous["record"], record)
        return None if previous["finished"] else "interrupted"

    def holds_progress(self) -> bool:
        """Whether anything here is worth keeping for a resume: a finished stage or a training checkpoint."""
        finished = any(stage["finished"] for stage in self.stages.values())
        return finished or any(self.out.glob("*/checkpoint-*"))

    def run(self, name: str, label: str, record: dict, work: Callable[[], object], resumable: bool) -> None:
        """Run `work` as stage `name` unless it already finished with this record. An interrupted stage resumes
        when `resumable` (training continues from its last checkpoint); anything else starts from scratch."""
        reason = self.reason_to_run(name, record)
        folder = self.out / name
        if reason is None:
            logger.info("%s: already finished in %s with the same options and data, skipping", label, folder)
            return
        resume = resumable and reason == "interrupted"
        if reason == "interrupted":
            logger.warning("%s: %s was left incomplete by an interrupted run; %s", label, folder,
                           "resuming from its last checkpoint" if resume else "running it again")
        elif reason != "first run":
            logger.warning("%s: running again from scratch (%s); later stages follow", label, reason)
        if not resume:
            self.forget_from(name)
        self.start(name, record)
        work()
        self.finish(name)

    def forget_from(self, name: str) -> None:
        """Delete the output of stage `name` and of every later stage: they were made from other inputs."""
        for later in STAGES[STAGES.index(name):]:
            shutil.rmtree(self.out / later, ignore_errors=True)
            self.stages.pop(later, None)
        self._save()

    def start(self, name: str, record: dict) -> None:
        self.stages[name] = {"record": record, "finished": False}
        self._save()

    def finish(self, name: str) -> None:
        self.stages[name]["finished"] = True
        self._save()

    def _save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        scratch = self.path.with_suffix(".json.tmp")  # written whole, then renamed: a kill never cuts the file
        scratch.write_text(json.dumps(self.stages, indent=2, ensure_ascii=False), encoding="utf-8")
        os.replace(scratch, self.path)


def run_pt_stage(args, extra: list[str], out: Path, state: PipelineState) -> dict:
    from medtune.config import parse_arguments
    from medtune.data.pretrain import validate_documents
    from medtune.stages import pt

    stage_dir = out / "pt"
    argv = ["--config", args.pt_config, "--output_dir", str(stage_dir), "--resume_from_checkpoint", "true"]
    if args.model_name_or_path:
        argv += ["--model_name_or_path", args.model_name_or_path]
    configs = parse_arguments(pt.ARGUMENT_TYPES, argv + extra, prog="medtune pipeline (pt)")
    validate_documents(configs[2])  # bad data stops here, before a finished stage is replaced
    record = pt_record(configs)
    state.run("pt", "pt", record, lambda: pt.run_pt(*configs), resumable=True)
    return _read_json(stage_dir / "eval_results.json") | _read_json(stage_dir / "train_results.json")


def run_merge_stage(out: Path, state: PipelineState) -> dict:
    from medtune.config import MergeArguments, ModelArguments
    from medtune.stages.merge import run_merge

    merged = out / "merged"
    record = {"adapter": state.stages["pt"]["record"]}  # the merge is as current as the adapter it folds in
    # A merge has no checkpoint: one left incomplete is removed and done again.
    state.run("merged", "merge", record, lambda: run_merge(ModelArguments(), MergeArguments(
        lora_model=str(out / "pt"), output_dir=str(merged))), resumable=False)
    return _read_json(merged / "merge_check.json")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_report(out: Path, pt_metrics: dict, merge_metrics: dict) -> Path:
    def number(key: str, source: dict, digits: int = 3) -> str:
        value = source.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"

    lines = [
        "# medtune pipeline report",
        "",
        "| stage | measure | value |",
        "|---|---|---|",
        f"| pt | eval perplexity before → after | {number('eval_perplexity_before_training', pt_metrics, 1)} → "
        f"{number('eval_perplexity', pt_metrics, 1)} |",
        f"| pt | eval token accuracy | {number('eval_token_accuracy', pt_metrics)} |",
        f"| pt | train loss | {number('train_loss', pt_metrics)} |",
        f"| pt | train time (s) | {number('train_runtime', pt_metrics, 1)} |",
        f"| merge | max logit difference (tolerance {merge_metrics.get('tolerance', '–')}) | "
        f"{number('max_abs_logit_difference', merge_metrics, 8)} |",
        "",
        f"- adapter: `{out / 'pt'}`  (TensorBoard: `tensorboard --logdir {out / 'pt' / 'runs'}`)",
        f"- merged model: `{out / 'merged'}`",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: list[str]) -> int:
    args, extra = build_parser().parse_known_args(argv)
    out = Path(args.output_dir)
    created = not out.exists()
    state = PipelineState(out)
    try:
        pt_metrics = run_pt_stage(args, extra, out, state)
        merge_metrics = run_merge_stage(out, state)
    except MedtuneError:
        if created and not state.holds_progress():
            shutil.rmtree(out, ignore_errors=True)  # a first run refused before any progress leaves nothing behind
        raise
    report = write_report(out, pt_metrics, merge_metrics)
    print(report.read_text(encoding="utf-8"))
    return 0

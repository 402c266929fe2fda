"""What a pipeline run leaves for people and tools: the data summary of each training stage, `run_manifest.json`
(how to reproduce the run) and `pipeline_results.json` (what the report reads; its shape is PIPELINE_RESULTS.md)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

from medtune.pipeline.config import DATA_STEPS
from medtune.pipeline.state import FOLDERS, PipelineState, file_sha256

STAGE_DATA_KIND = {"pt": "text", "sft": "sft", "dpo": "preference"}
STAGE_DEFAULT_DATA = {"pt": "pretrain", "sft": "finetune", "dpo": "reward"}
PACKAGES = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "medtune")


def train_location(stage: str, data_args) -> str | None:
    """The file or folder the stage trains on; None for a Hugging Face dataset (`dataset_name`)."""
    from medtune.paths import bundled_data_dir

    if getattr(data_args, "dataset_name", None):
        return None
    return data_args.train_file_dir or str(bundled_data_dir(STAGE_DEFAULT_DATA[stage]))


def data_locations(stage: str, data_args) -> list[str]:
    train = train_location(stage, data_args)
    return ([train] if train else []) + ([data_args.validation_file_dir] if data_args.validation_file_dir else [])


def data_files(stage: str, data_args) -> list[Path]:
    from medtune.data.loading import KIND_SUFFIXES
    from medtune.data.readers import list_data_files

    return [path for location in data_locations(stage, data_args)
            for path in list_data_files(location, KIND_SUFFIXES[STAGE_DATA_KIND[stage]])]


def digests(paths) -> dict[str, str]:
    return {str(path): file_sha256(Path(path)) for path in paths}


def data_summary(stage: str, model_args, data_args) -> list[dict]:
    """One entry per data file the stage reads: records, token lengths (encoded as the stage encodes them) and the
    records the stage drops or cuts, with why."""
    from medtune.data.check import token_lengths
    from medtune.data.loading import load_records
    from medtune.models.loader import load_chat_template, load_tokenizer, resolve_model_path

    model_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_path, model_args.trust_remote_code)
    # pt measures raw documents: only the tokenizer matters (a base model may have no chat template)
    template = (SimpleNamespace(tokenizer=tokenizer) if stage == "pt"
                else load_chat_template(model_path, tokenizer, model_args.template, data_args.system_prompt))
    forced = None if getattr(data_args, "data_format", "auto") == "auto" else data_args.data_format
    entries = []
    for location in data_locations(stage, data_args):
        records, reports = load_records(location, STAGE_DATA_KIND[stage], forced)
        by_file = defaultdict(list)
        for record in records:
            by_file[record.source.rpartition(":")[0]].append(record)
        for report in reports:
            kept = by_file[report.path]
            entries.append({"stage": stage, "file": report.path, "kind": STAGE_DATA_KIND[stage],
                            "records": report.records, **dropped_records(stage, kept, template, data_args),
                            "token_lengths": [n for record in kept for n in token_lengths(record, template)]})
    return entries


def dropped_records(stage: str, records: list, template, data_args) -> dict:
    """{"dropped": {why: count}, "truncated": count}, counted by the stages' own encoders."""
    if stage == "sft":
        from medtune.data.sft import encode_conversations

        _, stats = encode_conversations(records, template, data_args.model_max_length, data_args.train_on_prompt,
                                        data_args.max_source_length, data_args.max_target_length)
        dropped = {"no supervised token within model_max_length": stats.dropped_no_supervised_token}
        return {"dropped": {k: v for k, v in dropped.items() if v}, "truncated": stats.truncated}
    if stage == "dpo":
        from medtune.data.preference import encode_pairs

        usable = [p for p in records if p.chosen.strip() != p.rejected.strip()]  # the rule load_pairs applies
        # the stage's truncation_mode lives in its training arguments; the count of cut pairs does not depend on it
        _, stats = encode_pairs(usable, template, data_args.max_length, max_prompt=data_args.max_source_length,
                                max_answer=data_args.max_target_length)
        dropped = {"chosen and rejected identical": len(records) - len(usable)}
        return {"dropped": {k: v for k, v in dropped.items() if v}, "truncated": stats.truncated}
    return {"dropped": {}}  # pt keeps every document; a dropped final partial block is counted in data_stats.json


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def training_entry(state: PipelineState, stage: str) -> dict:
    folder = state.folder(stage)
    step = state.steps.get(stage, {})
    return {"log_history": _read_json(folder / "trainer_state.json").get("log_history", []),
            "wall_s": step.get("wall_s"), "peak_rss_mb": step.get("peak_rss_mb"),
            "train_loss": _read_json(folder / "train_results.json").get("train_loss")}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def pipeline_results(plan, state: PipelineState, models: list[tuple[str, str]], evaluations: dict) -> dict:
    trained = [stage for stage in ("pt", "sft", "dpo") if stage in plan.stages and state.steps.get(stage)]
    return {
        "schema": 1,
        "output_dir": str(plan.output_dir),
        "base_model": models[0][1],
        "random_weights": plan.random_weights,
        "created": now(),
        "models": [{"name": name, "path": path} for name, path in models],
        "training": {stage: training_entry(state, stage) for stage in trained},
        "evaluations": evaluations,
        "data": [entry for stage in trained for entry in state.steps[stage].get("data", [])],
        "data_safety": {step: state.steps[step]["summary"] for step in DATA_STEPS
                        if step in plan.stages and "summary" in state.steps.get(step, {})},
        "stages_wall_s": {name: step["wall_s"] for name, step in state.steps.items() if "wall_s" in step},
    }


def git_revision() -> dict | None:
    """The commit of the medtune checkout running (and whether it has uncommitted changes), when it is one."""
    from medtune.paths import project_root

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(project_root()), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"revision": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def run_manifest(plan, state: PipelineState, models: list[tuple[str, str]], argv: list[str], git: dict | None) -> dict:
    """Everything needed to say what ran: per step its effective options, input files and sha256, wall time and
    peak memory; package versions; git revision; the models' fingerprints."""
    from medtune.data.resume import folder_fingerprint

    steps = {name: {"folder": str(state.out / FOLDERS[name]), "finished": step["finished"], **step["record"],
                    "wall_s": step.get("wall_s"), "peak_rss_mb": step.get("peak_rss_mb")}
             for name, step in state.steps.items()}
    inputs = {path: sha for step in state.steps.values() for path, sha in step["record"].get("inputs", {}).items()}
    return {
        "schema": 1,
        "created": now(),
        "command": ["medtune", "pipeline", *argv],
        "config_file": str(plan.config_path),
        "config_sha256": file_sha256(plan.config_path),
        "stages": list(plan.stages),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git,
        "input_files_sha256": inputs,
        "models": {name: {"path": path, "fingerprint": folder_fingerprint(path)} for name, path in models},
        "steps": steps,
        "peak_rss_note": "peak_rss_mb: the pipeline process's peak resident memory during the step (Linux VmHWM, "
                         "reset at each step's start); wall_s: the step's own time. Steps skipped by this run keep "
                         "the figures of the run that made them.",
    }

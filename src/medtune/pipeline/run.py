"""Run the steps in order, each fed by the previous one's output, and write the results, manifest and report."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

from medtune.errors import MedtuneError
from medtune.pipeline.config import DATA_STEPS, PipelinePlan, parse_plan
from medtune.pipeline.state import PipelineState, Progress

logger = logging.getLogger(__name__)

# Options that say where a step writes or how it resumes, not what it computes: never a reason to run again.
NOT_COMPARED = {"resume_from_checkpoint", "output_dir"}
# Rough work units for the ETA, next to training's steps x batch: loading and saving a stage's model, a merge, and
# evaluating one model.
STAGE_UNITS, MERGE_UNITS, EVAL_UNITS_PER_MODEL, DATA_STEP_UNITS = 60.0, 40.0, 150.0, 20.0


def options_record(*instances) -> dict:
    from medtune.config.loader import effective_config

    options = {k: v for k, v in effective_config(*instances).items() if k not in NOT_COMPARED}
    return json.loads(json.dumps(options, default=str))


def training_units(training_args) -> float:
    steps = training_args.max_steps if training_args.max_steps > 0 else 100 * training_args.num_train_epochs
    return steps * training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps


def inherit_system_prompt(sections: dict[str, tuple], eval_section: str) -> None:
    """The models are evaluated with the system prompt they were trained with: an eval section without its own
    `system_prompt` takes the last training section's (dpo, else sft), for the base model too, so every model
    answers the same prompts."""
    eval_args = sections[eval_section][0]
    if eval_args.system_prompt is not None:
        return
    for stage in ("dpo", "sft"):
        prompt = sections[stage][2].system_prompt if stage in sections else None
        if prompt is not None:
            eval_args.system_prompt = prompt
            logger.info("eval: every model is evaluated with the %s section's system_prompt (set eval.system_prompt "
                        "to choose another, or '' for none)", stage)
            return


def validate_data(stage: str, configs: tuple) -> None:
    """Read and check every record the stage will train on, before a finished stage could be replaced."""
    data_args = configs[2]
    if stage == "pt":
        from medtune.data.pretrain import validate_documents

        validate_documents(data_args)
    elif stage == "sft":
        from medtune.data.sft import load_conversations

        load_conversations(data_args)
    else:
        from medtune.data.preference import load_pairs

        load_pairs(data_args)


class Pipeline:
    def __init__(self, plan: PipelinePlan, argv: list[str]):
        from medtune.pipeline.summary import git_revision

        self.plan, self.argv = plan, argv
        self.git = git_revision()  # the code that runs, read before a long run during which the checkout may move
        self.out = plan.output_dir.resolve()  # records name stage folders relative to it
        self.sections = self._parse_sections()
        self.state = PipelineState(self.out, Progress(self._work_units()))

    def _parse_sections(self) -> dict[str, tuple]:
        """Every enabled section parsed (and every evaluation file read) before anything runs: a typo in the eval
        section fails in a second, not after the training stages."""
        sections = {stage: self.plan.parse(stage) for stage in self.plan.stages if stage not in DATA_STEPS}
        sections["merge"] = self.plan.parse("merge", ["--lora_model", "-", "--output_dir", "-"])
        from medtune.pipeline.evaluation import check_eval_inputs

        if "contamination" in self.plan.stages:
            sections["contamination"] = self.plan.parse("contamination", ["--train", "-", "--eval", "-"])
            # contamination looks for the eval step's items even when that step does not run this time
            sections["eval-sets"] = sections.get("eval") or self.plan.parse("eval")
        for name in ("eval", "eval-sets"):
            if name in sections:
                inherit_system_prompt(sections, name)
                check_eval_inputs(*sections[name])
                break
        return sections

    def _work_units(self) -> dict[str, float]:
        units = {}
        for stage in self.plan.stages:
            if stage in DATA_STEPS:
                units[stage] = DATA_STEP_UNITS
                continue
            if stage == "eval":
                models = 1 + sum(s in ("pt", "sft", "dpo") for s in self.plan.stages)  # the base model + each stage's
                units["eval"] = EVAL_UNITS_PER_MODEL * models
                continue
            configs = self.sections[stage]
            # a DPO step runs two answers, plus the reference model
            units[stage] = STAGE_UNITS + training_units(configs[3]) * (3 if stage == "dpo" else 1)
            if configs[1].use_peft:
                units[f"merge-{stage}"] = MERGE_UNITS
        return units

    def relative(self, record: dict) -> dict:
        """The record with paths inside output_dir written relative to it: a copied or moved output folder still
        matches what its steps were made with."""
        inside = f"{self.out}{os.sep}"
        text = json.dumps(record, ensure_ascii=False).replace(json.dumps(inside, ensure_ascii=False)[1:-1], "")
        return json.loads(text)

    def run(self) -> dict:
        if self.plan.start_from:
            logger.info("--from %s: %s and every later step run again", self.plan.start_from, self.plan.start_from)
            self.state.forget_from(self.plan.start_from, why=f"--from {self.plan.start_from}")
        from medtune.models.loader import resolve_model_path

        models = [("base", resolve_model_path(self.plan.model_name_or_path))]
        training_data = self.run_data_steps()
        model_given = self.plan.model_name_or_path  # None: the embedded default, resolved by each command
        for stage in ("pt", "sft", "dpo"):
            if stage in self.plan.stages:
                model_given = self.train(stage, model_given, training_data.get(stage))
                models.append((stage, model_given))
        evaluations = self.evaluate(models) if "eval" in self.plan.stages else {}
        return self.write_outputs(models, evaluations)

    def run_data_steps(self) -> dict[str, dict[str, str]]:
        """scrub, then contamination, when enabled; returns stage -> {data option: the data it reads instead}
        (`train_file_dir`, and `validation_file_dir` once scrubbed; empty when no step replaces any)."""
        from medtune.pipeline import data_safety

        if not any(step in self.plan.stages for step in DATA_STEPS):
            return {}
        original = data_safety.training_sources(self.sections, self.plan.stages)
        sources, validation = dict(original), {}
        if "scrub" in self.plan.stages:
            sources, validation = data_safety.scrub_step(
                self.state, sources, data_safety.validation_sources(self.sections, self.plan.stages))
        if "contamination" in self.plan.stages:
            sources = data_safety.contamination_step(self.state, self.plan, sources,
                                                     data_safety.eval_sets(*self.sections["eval-sets"]),
                                                     self.relative)
        replaced: dict[str, dict[str, str]] = {}
        for stage, path in sources.items():
            if path != original[stage]:
                replaced.setdefault(stage, {})["train_file_dir"] = path
        for stage, path in validation.items():
            replaced.setdefault(stage, {})["validation_file_dir"] = path
        return replaced

    def train(self, stage: str, model: str | None, data: dict[str, str] | None = None) -> str:
        """Train `stage` on `model` (then merge its adapter), reading `data` (option -> location) where a data step
        replaced its train_file_dir or validation_file_dir; returns the model the next stage starts from."""
        from importlib import import_module

        from medtune.data.resume import folder_fingerprint
        from medtune.models.loader import resolve_model_path
        from medtune.pipeline.summary import data_files, data_summary, digests

        module = import_module(f"medtune.stages.{stage}")
        folder = self.state.folder(stage)
        tokens = ["--output_dir", str(folder), "--resume_from_checkpoint", "true"]
        tokens += [token for option, location in (data or {}).items() for token in (f"--{option}", location)]
        configs = self.plan.parse(stage, tokens + (["--model_name_or_path", model] if model else []))
        validate_data(stage, configs)
        start = resolve_model_path(model)  # its weights changing in place (same path) also means a re-run
        record = {"options": self.relative(options_record(*configs)), "inputs": digests(data_files(stage, configs[2])),
                  "models": self.relative({start: folder_fingerprint(start)})}

        def work() -> dict:
            data = data_summary(stage, configs[0], configs[2])
            getattr(module, f"run_{stage}")(*configs)
            return {"data": data}

        self.state.run(stage, record, work, resumable=True)
        if not configs[1].use_peft:
            return str(folder)  # full fine-tuning: the stage's folder is the model
        return self.merge(stage, record)

    def merge(self, stage: str, adapter_record: dict) -> str:
        from medtune.stages.merge import run_merge

        name = f"merge-{stage}"
        merged, adapter = self.state.folder(name), self.state.folder(stage)
        model_args, merge_args = self.sections["merge"]
        model_args = dataclasses.replace(model_args)
        merge_args = dataclasses.replace(merge_args, lora_model=str(adapter), output_dir=str(merged))
        # the merge is as current as the adapter it folds in
        record = {"options": self.relative(options_record(model_args, merge_args)), "adapter": adapter_record}
        def work() -> None:
            run_merge(model_args, merge_args)

        # A merge has no checkpoint: one left incomplete is removed and done again.
        self.state.run(name, record, work, resumable=False)
        return str(merged)

    def evaluate(self, models: list[tuple[str, str]]) -> dict:
        from medtune.data.resume import folder_fingerprint
        from medtune.pipeline.evaluation import eval_input_files, evaluate_model
        from medtune.pipeline.summary import digests

        eval_args, options = self.sections["eval"]
        folder = self.state.folder("eval")
        record = {"options": options_record(eval_args, options),
                  "inputs": digests(eval_input_files(eval_args, options)),
                  "models": self.relative({name: {"path": path, "fingerprint": folder_fingerprint(path)}
                                           for name, path in models})}
        results_file = folder / "evaluations.json"

        def work() -> None:
            evaluations = {}
            for name, path in models:
                logger.info("eval: %s (%s)", name, path)
                evaluations[name] = evaluate_model(path, folder / name, eval_args, options)
            results_file.write_text(json.dumps(evaluations, indent=1, ensure_ascii=False), encoding="utf-8")

        self.state.run("eval", record, work, resumable=True)
        return json.loads(results_file.read_text(encoding="utf-8"))

    def write_outputs(self, models: list[tuple[str, str]], evaluations: dict) -> dict:
        from medtune.pipeline.summary import pipeline_results, run_manifest
        from medtune.reporting import write_pipeline_report

        results = pipeline_results(self.plan, self.state, models, evaluations)
        (self.out / "pipeline_results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False),
                                                        encoding="utf-8")
        manifest = run_manifest(self.plan, self.state, models, self.argv, self.git)
        (self.out / "run_manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False),
                                                    encoding="utf-8")
        html, markdown = write_pipeline_report(self.out, results)
        logger.info("report: %s and %s", html, markdown)
        return results


def quiet_libraries() -> None:
    """The pipeline's log is one line per step plus one bar per long step (training, evaluation): no bars for
    loading a few-MB model or writing a tokenized cache (libraries' deprecation warnings are hidden where every
    command loads its model, `medtune.models.loader.load_model`)."""
    import datasets
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights", shard writing
    datasets.disable_progress_bars()  # "Generating train split", "Saving the dataset"


def main(argv: list[str]) -> int:
    plan = parse_plan(argv)
    quiet_libraries()
    out = plan.output_dir
    created = not out.exists()
    pipeline = None
    try:
        pipeline = Pipeline(plan, argv)
        pipeline.run()
    except MedtuneError:
        # a first run refused before any progress leaves nothing behind
        if created and (pipeline is None or not pipeline.state.holds_progress()):
            shutil.rmtree(out, ignore_errors=True)
        raise
    print((out / "report.md").read_text(encoding="utf-8"))
    return 0


"""The pipeline's YAML: top-level settings plus one section per stage, each section holding exactly the options of
that stage's command and parsed through the same dataclasses (so every option is declared once, in
medtune.config.args, and a typo is an error naming the file, line, section and key).

    model_name_or_path: /models/glm-4-9b-chat-hf     # the base model (default: the embedded tiny GLM-4)
    output_dir: outputs/pipeline
    stages: [pt, sft, dpo, eval]                     # each training stage is followed by its merge
    scrub: {}                                        # optional: train on scrubbed copies (`medtune data scrub`)
    contamination: {threshold: 0.3}                  # optional: `medtune data contamination` options + drop_contaminated
    pt:    {block_size: 1024, learning_rate: 2.0e-4, ...}    # `medtune pt` options
    sft:   {...}                                             # `medtune sft` options
    dpo:   {...}                                             # `medtune dpo` options
    merge: {check_tolerance: 1.0e-4}                         # `medtune merge` options (every merge)
    eval:  {limit: 200, max_new_tokens: 64, ...}             # `medtune eval` options + the pipeline's own below

Command-line overrides name the section: `--sft.learning_rate 1e-4`.
"""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.errors import ConfigError

TRAINING_STAGES = ("pt", "sft", "dpo")
# Optional steps on the training data, before any training; off unless named in `stages:` or given a section.
DATA_STEPS = ("scrub", "contamination")
DEFAULT_STAGES = (*TRAINING_STAGES, "eval")
# What `stages:` and --skip name; each training stage brings its merge.
USER_STAGES = (*DATA_STEPS, *DEFAULT_STAGES)
# Every step in run order; a step that runs again invalidates every later one.
STEPS = (*DATA_STEPS, "pt", "merge-pt", "sft", "merge-sft", "dpo", "merge-dpo", "eval")
SECTIONS = (*DATA_STEPS, *TRAINING_STAGES, "merge", "eval")
TOP_LEVEL = ("model_name_or_path", "output_dir", "stages")
# Options the pipeline sets itself, per section: a value from the user would be overwritten, so it is refused.
PIPELINE_SET = {
    "pt": ("model_name_or_path", "output_dir", "resume_from_checkpoint"),
    "merge": ("model_name_or_path", "lora_model", "output_dir"),
    "eval": ("output_dir", "adapter_name_or_path", "endpoint", "endpoint_model", "mode", "split", "answers_file",
             "predictions", "truth"),
}
PIPELINE_SET["sft"] = PIPELINE_SET["dpo"] = PIPELINE_SET["pt"]
# The data steps read the training stages' data and the eval step's sets, and write into output_dir.
PIPELINE_SET["scrub"] = ("paths", "output_dir")
PIPELINE_SET["contamination"] = ("train", "eval", "report", "write_clean")
DEFAULT_CONFIG = "pipeline_tiny.yaml"


@dataclass
class PipelineEvalArguments:
    """The pipeline's evaluation of the base model and of every stage's model, on identical items. Set in the
    `eval:` section next to `medtune eval` options (`limit` = CMB-Exam items, `max_new_tokens` = the generation
    budget of the generate subset and CMB-Clin, `data_dir` = the CMB folder, `judge_endpoint` = an LLM judge)."""

    generate_limit: int = field(
        default=8, metadata={"help": "CMB-Exam items also answered in generate mode (the first N of the sample, "
                                     "max_new_tokens each); 0 skips generate mode."})
    safety_file: str | None = field(
        default=None, metadata={"help": "Drug-safety probe items (CMB schema with answers). Default: the bundled "
                                        "60-item probe."})
    clin_limit: int = field(default=2, metadata={"help": "CMB-Clin cases consulted; 0 skips CMB-Clin."})
    perplexity_data_dir: str | None = field(
        default=None, metadata={"help": "Held-out text for perplexity. Default: the bundled corpus's held-out "
                                        "documents (those `medtune pt` holds out by default)."})
    general_eval_file: str | None = field(
        default=None, metadata={"help": "A general-knowledge set in the CMB-Exam schema with answers (e.g. C-Eval or "
                                        "CMMLU converted): evaluated for every model, to see what medical training "
                                        "costs in general ability. Uses `limit` too."})

    def __post_init__(self):
        if self.generate_limit < 0 or self.clin_limit < 0:
            raise ConfigError("generate_limit and clin_limit must be >= 0")


@dataclass
class PipelineContaminationArguments:
    """The pipeline's own option of the `contamination:` section, next to `medtune data contamination` options."""

    drop_contaminated: bool = field(
        default=False, metadata={"help": "Train on copies of the training data without the records holding an "
                                         "evaluation item (--write_clean). Default: only report them."})


def contamination_types() -> tuple:
    """`medtune data contamination`'s options, with the two the pipeline sets itself (train, eval) optional: they are
    refused in the section and filled in after parsing."""
    from medtune.data.contamination import ContaminationArguments

    @dataclass
    class PipelineSetPaths(ContaminationArguments):
        train: list[str] = field(default_factory=list, metadata={"help": "Set by the pipeline."})
        eval: list[str] = field(default_factory=list, metadata={"help": "Set by the pipeline."})

    return PipelineSetPaths, PipelineContaminationArguments


def section_types(section: str) -> tuple:
    """The dataclasses a section is parsed with: those of the stage's own command."""
    from medtune.config import EvalArguments, MergeArguments, ModelArguments

    if section in TRAINING_STAGES:
        from importlib import import_module

        return import_module(f"medtune.stages.{section}").ARGUMENT_TYPES
    if section == "merge":
        return ModelArguments, MergeArguments
    if section == "contamination":
        return contamination_types()
    if section == "scrub":
        return ()  # `medtune data scrub` has only its inputs and output folder, both set by the pipeline
    return EvalArguments, PipelineEvalArguments


def sections_help() -> str:
    """The epilog: where each section's options are documented, and the eval section's own options."""
    def own(dataclass_type) -> list[str]:
        return [textwrap.fill(f"{f.name} (default {f.default!r}): {f.metadata['help']}", 100, initial_indent="  ",
                              subsequent_indent="      ") for f in dataclasses.fields(dataclass_type)]

    intro = textwrap.fill("sections: pt, sft, dpo and merge take the options of `medtune pt|sft|dpo|merge --help`; "
                          "eval takes those of `medtune eval cmb-exam --help` (limit: CMB-Exam items; "
                          "max_new_tokens: the generation budget), plus:", 100)
    data = textwrap.fill("optional steps before training (off unless named in stages: or given a section): "
                         "`scrub: {}` trains every stage on scrubbed copies of its data (`medtune data scrub`); "
                         "`contamination:` looks for the eval step's items in every stage's training data and "
                         "takes the options of `medtune data contamination --help` (ngram, threshold), plus:", 100)
    return "\n".join([intro, *own(PipelineEvalArguments), data, *own(PipelineContaminationArguments)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune pipeline",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=sections_help(),
        description=textwrap.fill("The whole path on one command: pt -> merge -> sft -> merge -> dpo -> merge -> eval, each stage "
                    "trained on the previous stage's merged model, then the base model and every stage's model "
                    "evaluated on the same items; writes pipeline_results.json, run_manifest.json, report.html and "
                    "report.md. Optional steps before training: scrub (the stages train on scrubbed copies) and "
                    "contamination (evaluation items found in the training data; reported, or dropped). "
                    "Without options it runs the bundled quickstart on the embedded tiny GLM-4 model. "
                    "Re-running the same command skips finished stages and resumes an interrupted one; a stage "
                    "whose options or data files changed runs again with every stage after it, and the log says "
                    "what changed. Stage options on the command line name their section: --sft.learning_rate 1e-4.", 100),
    )
    parser.add_argument("--config", default=None, metavar="YAML",
                        help=f"Pipeline YAML: one section per stage (default: configs/{DEFAULT_CONFIG}).")
    parser.add_argument("--output_dir", default=None, help="Folder for every stage's output (default: the YAML's "
                                                           "output_dir, else outputs/pipeline).")
    parser.add_argument("--model_name_or_path", default=None, help="Base model (default: the YAML's, else the "
                                                                   "embedded tiny GLM-4).")
    parser.add_argument("--skip", nargs="+", default=[], choices=USER_STAGES, metavar="STAGE",
                        help=f"Stages not to run ({', '.join(USER_STAGES)}); a skipped training stage skips its "
                             "merge, and the next stage trains on the model before it.")
    parser.add_argument("--from", dest="start_from", default=None, choices=STEPS, metavar="STEP",
                        help=f"Run this step and every later one again even if finished ({', '.join(STEPS)}).")
    return parser


@dataclass
class PipelinePlan:
    """What to run: the YAML's sections plus the command line's overrides, and where."""

    config_path: Path
    output_dir: Path
    model_name_or_path: str | None
    stages: tuple[str, ...]
    start_from: str | None
    sections: dict[str, list[tuple[str, Any, str]]]  # section -> (key, value, "file:line") entries
    overrides: dict[str, list[str]]  # section -> command-line tokens

    @property
    def random_weights(self) -> bool:
        return self.model_name_or_path is None  # the embedded tiny model is randomly initialised

    def parse(self, section: str, pipeline_tokens: list[str] = ()) -> tuple:
        """The section's dataclass instances: YAML entries, then command-line overrides, then what the pipeline
        sets (output folders, the model each stage starts from)."""
        from medtune.config import parse_arguments

        tokens = self.overrides.get(section, [])
        try:
            return parse_arguments(section_types(section), [*tokens, *pipeline_tokens],
                                   prog=f"medtune pipeline ({section})", config_entries=self.sections.get(section, []))
        except ConfigError as exc:
            message = str(exc)
            if message.startswith("command line:"):
                message = message.replace("command line:", f"command line: --{section}.*:", 1)
            raise ConfigError(message) from None


def parse_plan(argv: list[str]) -> PipelinePlan:
    from medtune.paths import bundled_config

    args, extra = build_parser().parse_known_args(argv)
    config_path = Path(args.config) if args.config else bundled_config(DEFAULT_CONFIG)
    top, sections = read_pipeline_yaml(config_path)
    # a data step's section switches it on, as naming it in `stages:` does
    stages = [*top.get("stages", DEFAULT_STAGES), *(step for step in DATA_STEPS if step in sections)]
    return PipelinePlan(
        config_path=config_path,
        output_dir=Path(args.output_dir or top.get("output_dir") or "outputs/pipeline"),
        model_name_or_path=args.model_name_or_path or top.get("model_name_or_path"),
        stages=tuple(s for s in USER_STAGES if s in stages and s not in args.skip),
        start_from=args.start_from,
        sections=sections,
        overrides=route_overrides(extra),
    )


def read_pipeline_yaml(path: Path) -> tuple[dict, dict[str, list]]:
    """(top-level settings, section -> (key, value, where) entries), every key checked."""
    from medtune.config.loader import read_yaml_entries, unknown_key_error

    top: dict[str, Any] = {}
    sections: dict[str, list] = {}
    for key, value, line in read_yaml_entries(path, sections=SECTIONS):
        where = f"{path}:{line}"
        if key in SECTIONS:
            sections[key] = [(k, v, f"{path}:{n}: {key}") for k, v, n in (value or [])]
            refuse_pipeline_set(key, [(k, w) for k, _, w in sections[key]])
            if key == "scrub":
                for name, _, section_where in sections[key]:
                    raise unknown_key_error(name, [], section_where)
        elif key in TOP_LEVEL:
            top[key] = value
        else:
            raise unknown_key_error(key, [*TOP_LEVEL, *SECTIONS], where)
    stages = top.get("stages")
    if stages is not None:
        if not isinstance(stages, list) or not stages or any(s not in USER_STAGES for s in stages):
            raise ConfigError(f"{path}: stages: expected a list of {', '.join(USER_STAGES)}, got {stages!r}")
    return top, sections


def refuse_pipeline_set(section: str, keys: list[tuple[str, str]]) -> None:
    for key, where in keys:
        if key in PIPELINE_SET.get(section, ()):
            raise ConfigError(f"{where}: {key}: set by the pipeline (each stage's model and folder follow from "
                              "model_name_or_path and output_dir at the top level); remove it")


def route_overrides(tokens: list[str]) -> dict[str, list[str]]:
    """`--sft.learning_rate 1e-4 --pt.max_steps 5` -> {"sft": ["--learning_rate", "1e-4"], "pt": [...]}."""
    routed: dict[str, list[str]] = {}
    section = None
    for token in tokens:
        if token.startswith("--"):
            name, _, key = token[2:].partition(".")
            if name not in SECTIONS or not key:
                raise ConfigError(f"command line: {token.split('=')[0]}: not a pipeline option; a stage's option "
                                  f"names its section, e.g. --sft.learning_rate 1e-4 (sections: "
                                  f"{', '.join(SECTIONS)})")
            section = name
            refuse_pipeline_set(section, [(key.split("=")[0], f"command line: --{section}")])
            routed.setdefault(section, []).append("--" + key)
        elif section is None:
            raise ConfigError(f"command line: unexpected argument {token!r}")
        else:
            routed[section].append(token)
    return routed

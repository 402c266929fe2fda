"""The pipeline's evaluation: every model (base, then each stage's) through the same `medtune eval` functions with
the same options, so every model answers the identical items. Each measure writes into
`eval/<model>/<measure>/`, where `medtune eval`'s own resume key (options + weights fingerprint) lets a re-run reuse
the answers of a model that did not change."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from medtune.errors import ConfigError

logger = logging.getLogger(__name__)


def measure_arguments(eval_args, options) -> dict[str, object]:
    """measure -> the EvalArguments it runs with (output_dir filled in per model); absent measures are off."""
    replace = dataclasses.replace
    measures = {"cmb_exam": replace(eval_args, mode="likelihood")}
    if options.generate_limit:
        limit = min(options.generate_limit, eval_args.limit or options.generate_limit)
        measures["cmb_exam_generate"] = replace(eval_args, mode="generate", limit=limit)
    measures["safety"] = replace(eval_args, mode="likelihood", data_dir=options.safety_file, limit=None, shots=0)
    if options.clin_limit:
        measures["clin"] = replace(eval_args, limit=options.clin_limit)
    # perplexity scores raw text: the eval section's system_prompt is for the chat-rendered measures
    measures["perplexity"] = replace(eval_args, data_dir=options.perplexity_data_dir, limit=None, system_prompt=None)
    if options.general_eval_file:
        measures["general"] = replace(eval_args, mode="likelihood", data_dir=options.general_eval_file, shots=0)
    return measures


def eval_input_files(eval_args, options) -> list[Path]:
    """Every file the evaluation reads (its sha256 goes into the eval step's record and the manifest)."""
    from medtune.data.loading import KIND_SUFFIXES
    from medtune.data.readers import list_data_files
    from medtune.eval.runner import SAFETY_PROBE
    from medtune.paths import bundled_data_dir

    locations = [eval_args.data_dir or bundled_data_dir("eval/cmb"), options.safety_file or bundled_data_dir(SAFETY_PROBE),
                 options.perplexity_data_dir or bundled_data_dir("pretrain"), options.general_eval_file]
    suffixes = tuple({s for kind in KIND_SUFFIXES.values() for s in kind})
    return [path for location in locations if location for path in list_data_files(location, suffixes)]


def check_eval_inputs(eval_args, options) -> None:
    """Read every evaluation file before any training, so a bad one fails in seconds, not after the stages."""
    from medtune.eval.clin import load_cases
    from medtune.eval.runner import SAFETY_PROBE, load_exam, perplexity_documents

    for name, args in measure_arguments(eval_args, options).items():
        if name == "clin":
            load_cases(args)
        elif name == "perplexity":
            perplexity_documents(args)
        else:
            keys = load_exam(args, SAFETY_PROBE if name == "safety" else "eval/cmb")[2]
            if keys is None:
                raise ConfigError(f"eval: {name}: {args.data_dir or 'the CMB items'} has no answers (give each item "
                                  "its answer, or a test_answers.json beside test.json)")


def evaluate_model(model_path: str, folder: Path, eval_args, options) -> dict:
    """Every measure for one model -> {measure: results} (see PIPELINE_RESULTS.md for the shapes)."""
    from medtune.config import ModelArguments
    from medtune.eval.clin import run_clin
    from medtune.eval.runner import SAFETY_PROBE, run_exam, run_perplexity

    model_args = ModelArguments(model_name_or_path=model_path)
    results = {}
    for name, args in measure_arguments(eval_args, options).items():
        args = dataclasses.replace(args, output_dir=str(folder / name))
        if name == "clin":
            results[name] = run_clin(model_args, args)
        elif name == "perplexity":
            results[name] = run_perplexity(model_args, args)
        elif name == "safety":
            results[name] = run_exam(model_args, args, default_data=SAFETY_PROBE, title="Drug-safety probe")
            results[name]["items"] = item_answers(args, SAFETY_PROBE)
        else:
            title = "General knowledge" if name == "general" else "CMB-Exam"
            results[name] = run_exam(model_args, args, title=title)
    return results


def item_answers(args, default_data: str) -> list[dict]:
    """Each item with the model's answer (from the answers.json run_exam wrote), for the changed-answers table."""
    from medtune.eval.cmb import is_right, read_model_answers
    from medtune.eval.runner import load_exam

    items, _, keys = load_exam(args, default_data)
    answers = read_model_answers(Path(args.output_dir) / "answers.json")
    key_of = {key.id: key for key in keys}
    return [{"id": item.id, "question": item.question, "options": item.options, "answer": key_of[item.id].answer,
             "model_answer": answers.get(item.id, ""),
             "correct": is_right(answers.get(item.id, ""), key_of[item.id], args.official)} for item in items]

"""The `medtune` command line. Only dispatch lives here: each command's work is in its own module, imported
when the command runs, so `medtune --help` starts instantly without importing torch."""

from __future__ import annotations

import logging
import sys

from medtune import __version__
from medtune.errors import ConfigError, MedtuneError, failed_write_reported, file_named_by


def init_model(argv: list[str]) -> int:
    import argparse

    from medtune.models.tiny import ARCHS

    parser = argparse.ArgumentParser(
        prog="medtune init-model",
        description="Build a tiny randomly initialised model offline: a byte-level BPE tokenizer trained on the "
                    "bundled medical corpus, with the family's special tokens and chat template, and a model of a "
                    "few million parameters. Deterministic for a given seed.",
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), default="glm4",
                        help="glm4: GLM-4-9B-Chat layout (GlmForCausalLM); qwen2: Qwen2/2.5; llama: Llama-3.")
    parser.add_argument("--out", required=True, help="Output folder.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random weights (default 0).")
    args = parser.parse_args(argv)
    from medtune.models.tiny import build_tiny_model

    print(build_tiny_model(args.arch, args.out, args.seed))
    return 0


DATA_COMMANDS = {  # name -> (module with main(argv), one-line description)
    "check": ("medtune.data.check", "validate data files and print counts, token-length percentiles and every problem"),
    "contamination": ("medtune.data.contamination", "find evaluation items inside training data (n-gram overlap); "
                                                    "--write_clean drops those records"),
    "scrub": ("medtune.data.scrub", "replace personal information with typed placeholders (--output_dir OUT)"),
    "convert": ("medtune.data.convert", "convert C-Eval / CMMLU CSV files into CMB-Exam items for `medtune eval`"),
}


def data(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: medtune data <command> PATH... [options]\n\ncommands:")
        print("\n".join(f"  {name:<14} {text}" for name, (_, text) in DATA_COMMANDS.items()))
        return 0
    if argv[0] not in DATA_COMMANDS:
        raise ConfigError(f"unknown data command {argv[0]!r}; one of {', '.join(DATA_COMMANDS)}")
    import importlib

    return importlib.import_module(DATA_COMMANDS[argv[0]][0]).main(argv[1:])


def pt(argv: list[str]) -> int:
    from medtune.config import parse_arguments
    from medtune.stages import pt as stage

    stage.run_pt(*parse_arguments(stage.ARGUMENT_TYPES, argv, prog="medtune pt", description=stage.DESCRIPTION))
    return 0


def sft(argv: list[str]) -> int:
    from medtune.config import parse_arguments
    from medtune.stages import sft as stage

    stage.run_sft(*parse_arguments(stage.ARGUMENT_TYPES, argv, prog="medtune sft", description=stage.DESCRIPTION))
    return 0


def dpo(argv: list[str]) -> int:
    from medtune.config import parse_arguments
    from medtune.stages import dpo as stage

    stage.run_dpo(*parse_arguments(stage.ARGUMENT_TYPES, argv, prog="medtune dpo", description=stage.DESCRIPTION))
    return 0


EVAL_COMMANDS = {
    "cmb-exam": "CMB-Exam multiple choice: likelihood or generate mode, official prompts and scoring",
    "cmb-score": "score any answer file [{id, model_answer}] against an answer key",
    "cmb-clin": "CMB-Clin clinical cases: multi-turn consultation, ROUGE-L/BLEU, optional LLM judge",
    "safety": "the bundled drug-safety probe (pregnancy, lactation, children, elderly, allergy, interactions)",
    "ppl": "perplexity on held-out medical text",
}


def evaluate(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in EVAL_COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            raise ConfigError(f"unknown eval command {argv[0]!r}; one of {', '.join(EVAL_COMMANDS)}")
        print("usage: medtune eval <command> [options]\n\ncommands:")
        print("\n".join(f"  {name:<10} {text}" for name, text in EVAL_COMMANDS.items()))
        print("\n`medtune eval <command> --help` lists the options.")
        return 0
    from medtune.config import EvalArguments, ModelArguments, parse_arguments
    from medtune.eval import runner

    command = argv[0]
    model_args, eval_args = parse_arguments((ModelArguments, EvalArguments), argv[1:], prog=f"medtune eval {command}",
                                            description=EVAL_COMMANDS[command])
    if command == "cmb-exam":
        runner.run_exam(model_args, eval_args)
    elif command == "safety":
        runner.run_exam(model_args, eval_args, default_data=runner.SAFETY_PROBE, title="Drug-safety probe")
    elif command == "cmb-score":
        runner.run_score(eval_args)
    elif command == "ppl":
        runner.run_perplexity(model_args, eval_args)
    else:
        from medtune.eval import clin

        clin.run_clin(model_args, eval_args)
    return 0


def merge(argv: list[str]) -> int:
    from medtune.config import parse_arguments
    from medtune.stages import merge as stage

    stage.run_merge(*parse_arguments(stage.ARGUMENT_TYPES, argv, prog="medtune merge", description=stage.DESCRIPTION))
    return 0


def chat(argv: list[str]) -> int:
    from medtune.config import (
        AdapterArguments,
        ChatArguments,
        GenerationArguments,
        ModelArguments,
        parse_arguments,
    )
    from medtune.serve import chat as command

    types = (ModelArguments, AdapterArguments, GenerationArguments, ChatArguments)
    return command.run_chat(*parse_arguments(types, argv, prog="medtune chat", description=command.DESCRIPTION))


def predict(argv: list[str]) -> int:
    from medtune.config import (
        AdapterArguments,
        GenerationArguments,
        ModelArguments,
        PredictArguments,
        parse_arguments,
    )
    from medtune.serve import predict as command

    types = (ModelArguments, AdapterArguments, GenerationArguments, PredictArguments)
    command.run_predict(*parse_arguments(types, argv, prog="medtune predict", description=command.DESCRIPTION))
    return 0


def estimate_memory(argv: list[str]) -> int:
    from medtune.estimate import main as estimate

    return estimate(argv)


def serve(argv: list[str]) -> int:
    from medtune import serve as server
    from medtune.config import AdapterArguments, ModelArguments, ServeArguments, parse_arguments

    server.run_serve(*parse_arguments((ModelArguments, AdapterArguments, ServeArguments), argv, prog="medtune serve",
                                      description=server.DESCRIPTION))
    return 0


def pipeline(argv: list[str]) -> int:
    from medtune import pipeline as orchestration

    return orchestration.main(argv)


# command -> (handler, one-line description)
COMMANDS = {
    "init-model": (init_model, "Build an embedded tiny model (GLM-4, Qwen2 or Llama layout) offline."),
    "data": (data, "Data tools: check (validate, describe), scrub (remove personal information), contamination (eval items in training data), convert."),
    "pt": (pt, "Continued pretraining on medical text (LoRA or full fine-tuning)."),
    "sft": (sft, "Supervised fine-tuning on conversations, assistant-only loss, packing (LoRA or full)."),
    "dpo": (dpo, "Preference optimisation: DPO (sigmoid/ipo/hinge/...), ORPO, SimPO, KTO; LoRA or full."),
    "eval": (evaluate, "Evaluate: cmb-exam, cmb-score, cmb-clin, safety, ppl (local model or OpenAI endpoint)."),
    "merge": (merge, "Merge a LoRA adapter into its base model, checking that logits match."),
    "chat": (chat, "Talk to a model in the terminal (streamed, multi-turn, /system, /clear, /exit)."),
    "predict": (predict, "Replies for every prompt of a file (batched, resumable; --backend vllm on a GPU)."),
    "estimate-memory": (estimate_memory, "Per-GPU training memory (LoRA, QLoRA, full; ZeRO 0-3) from a config.json."),
    "serve": (serve, "An OpenAI-compatible HTTP server with a chat page (batched; --backend vllm on GPUs)."),
    "pipeline": (pipeline, "The whole path on one command: pt, sft, dpo (each merged), evaluation of every model, a report."),
}


def usage() -> str:
    lines = [f"usage: medtune <command> [options]   (medtune {__version__})", "", "commands:"]
    lines += [f"  {name:<16} {description}" for name, (_, description) in COMMANDS.items()]
    lines += ["", "`medtune <command> --help` lists a command's options. Training stages also take "
                  "`--config FILE.yaml`;", "command-line options override the file."]
    return "\n".join(lines)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"medtune: error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    setup_logging()
    try:
        # a full disk that no command explained more closely is still one line naming the file, as for bad input;
        # any other error that is not a MedtuneError is a bug and keeps its traceback
        with failed_write_reported(lambda exc: f"{file_named_by(exc, 'writing output')}: "
                                   f"{getattr(exc, 'strerror', None) or 'No space left on device'}; free space (or "
                                   "choose another --output_dir) and run again"):
            return int(COMMANDS[command][0](rest) or 0)
    except MedtuneError as exc:
        for line in str(exc).splitlines():
            print(f"medtune: error: {line}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("medtune: interrupted", file=sys.stderr)
        return 130

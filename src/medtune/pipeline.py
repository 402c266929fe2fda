"""`medtune pipeline`: the whole path on one command, each stage reading the previous stage's output.

Today: continued pretraining -> merge -> report. Re-running the same command resumes: finished stages are
skipped, an interrupted training stage continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from medtune.paths import bundled_config

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medtune pipeline",
        description="Continued pretraining then merge, with a markdown report. Without options it runs the "
                    "embedded tiny GLM-4 model on the bundled corpus. Extra options (e.g. --learning_rate 1e-4) "
                    "go to the pt stage.",
    )
    parser.add_argument("--output_dir", default="outputs/pipeline", help="Folder for every stage's output.")
    parser.add_argument("--model_name_or_path", default=None, help="Base model (default: the embedded tiny GLM-4).")
    parser.add_argument("--pt_config", default=str(bundled_config("pt_tiny.yaml")), help="YAML for the pt stage.")
    return parser


def run_pt_stage(args, extra: list[str], out: Path) -> dict:
    from medtune.config import parse_arguments
    from medtune.stages import pt

    stage_dir = out / "pt"
    if (stage_dir / "train_results.json").is_file():
        logger.info("pt: already finished in %s, skipping", stage_dir)
    else:
        argv = ["--config", args.pt_config, "--output_dir", str(stage_dir), "--resume_from_checkpoint", "true"]
        if args.model_name_or_path:
            argv += ["--model_name_or_path", args.model_name_or_path]
        pt.run_pt(*parse_arguments(pt.ARGUMENT_TYPES, argv + extra, prog="medtune pipeline (pt)"))
    return _read_json(stage_dir / "eval_results.json") | _read_json(stage_dir / "train_results.json")


def run_merge_stage(out: Path) -> dict:
    from medtune.config import MergeArguments, ModelArguments
    from medtune.stages.merge import run_merge

    merged = out / "merged"
    if not (merged / "merge_check.json").is_file():
        run_merge(ModelArguments(), MergeArguments(lora_model=str(out / "pt"), output_dir=str(merged)))
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
    pt_metrics = run_pt_stage(args, extra, out)
    merge_metrics = run_merge_stage(out)
    report = write_report(out, pt_metrics, merge_metrics)
    print(report.read_text(encoding="utf-8"))
    return 0

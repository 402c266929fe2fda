"""Training throughput on the embedded tiny model, one JSON line per run.

    python benchmarks/train_throughput.py --stage pt [--steps 30] [--block_size 128] [--batch_size 8]

Prints tokens/s (every computed position), real tokens/s (excluding padding), samples/s, peak RSS in MB, wall
seconds and the real-token fraction of what was computed, for a fixed tiny configuration on the bundled corpus.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def real_token_fraction(dataset, samples: int) -> float:
    """Share of the first `samples` training blocks' positions that are real tokens (the Trainer's order may
    differ, but with remainder=pad only the last block has any padding, so this is exact or conservative)."""
    masks = dataset.select(range(min(samples, len(dataset))))["attention_mask"]
    return sum(map(sum, masks)) / sum(map(len, masks))


def bench_pt(args) -> dict:
    from medtune.config import parse_arguments
    from medtune.data.pretrain import prepare_block_datasets
    from medtune.models.loader import load_tokenizer, resolve_model_path
    from medtune.stages import pt

    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--config", str(REPO / "configs" / "pt_tiny.yaml"), "--output_dir", scratch, "--report_to", "none",
                "--max_steps", str(args.steps), "--block_size", str(args.block_size), "--per_device_train_batch_size",
                str(args.batch_size), "--validation_split_percentage", "0", "--save_strategy", "no",
                "--logging_steps", str(args.steps)]
        configs = parse_arguments(pt.ARGUMENT_TYPES, argv)
        # Tokenize outside the timed region (cached afterwards), as a real re-run would.
        tokenizer = load_tokenizer(resolve_model_path(None))
        train, _, _ = prepare_block_datasets(configs[2], tokenizer)
        started = time.perf_counter()
        pt.run_pt(*configs)
        wall = time.perf_counter() - started
        state = json.loads((Path(scratch) / "trainer_state.json").read_text())
    runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    samples = args.steps * args.batch_size
    computed = samples * args.block_size
    fraction = real_token_fraction(train, samples)
    return {
        "stage": "pt",
        "steps": args.steps,
        "block_size": args.block_size,
        "batch_size": args.batch_size,
        "tokens_per_s": round(computed / runtime, 1),
        "real_tokens_per_s": round(computed * fraction / runtime, 1),
        "samples_per_s": round(samples / runtime, 2),
        "real_token_fraction": round(fraction, 4),
        "train_runtime_s": round(runtime, 2),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["pt"], default="pt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--block_size", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(bench_pt(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput on the embedded tiny model, one JSON line per run.

    python benchmarks/train_throughput.py --stage pt  [--steps 30] [--block_size 128] [--batch_size 8]
    python benchmarks/train_throughput.py --stage sft [--steps 20] [--batch_size 4]   (packing on, then off)

Prints tokens/s (every computed position), real tokens/s (excluding padding), samples/s, peak RSS in MB, wall
seconds and the real-token fraction of what was computed, for a fixed tiny configuration on the bundled data.
Peak RSS is the process's high-water mark, so for sft run each packing mode alone (--packing) to compare memory.
"""

from __future__ import annotations

import argparse
import contextlib
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


class CountingCollator:
    """Wraps a collator to count every computed position and the real (non-padding) tokens among them."""

    def __init__(self, inner):
        self.inner, self.computed, self.real = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.computed += batch["input_ids"].numel()
        self.real += sum(len(f["input_ids"]) for f in features)
        return batch


def bench_sft(args, packing: bool) -> dict:
    import medtune.stages.sft as sft_stage
    from medtune.config import parse_arguments
    from medtune.data import collators

    counters = []

    def counted(cls):
        def build(pad_token_id):
            counters.append(CountingCollator(cls(pad_token_id)))
            return counters[-1]
        return build

    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--config", str(REPO / "configs" / "sft_tiny.yaml"), "--output_dir", scratch, "--report_to", "none",
                "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
                "--validation_split_percentage", "0", "--save_strategy", "no", "--logging_steps", str(args.steps),
                "--packing", str(packing).lower()]
        configs = parse_arguments(sft_stage.ARGUMENT_TYPES, argv)
        originals = collators.PackedCollator, collators.PaddingCollator
        collators.PackedCollator, collators.PaddingCollator = (counted(c) for c in originals)
        try:
            started = time.perf_counter()
            sft_stage.run_sft(*configs)
            wall = time.perf_counter() - started
        finally:
            collators.PackedCollator, collators.PaddingCollator = originals
        state = json.loads((Path(scratch) / "trainer_state.json").read_text())
    runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    counter = counters[0]
    return {
        "stage": "sft",
        "packing": packing,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "tokens_per_s": round(counter.computed / runtime, 1),
        "real_tokens_per_s": round(counter.real / runtime, 1),
        "real_token_fraction": round(counter.real / counter.computed, 4),
        "samples_per_s": round(args.steps * args.batch_size / runtime, 2),
        "train_runtime_s": round(runtime, 2),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["pt", "sft"], default="pt")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps (default: pt 30, sft 20).")
    parser.add_argument("--block_size", type=int, default=128, help="pt only.")
    parser.add_argument("--batch_size", type=int, default=None, help="Per-device batch (default: pt 8, sft 4).")
    parser.add_argument("--packing", choices=["both", "true", "false"], default="both", help="sft only.")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints metric tables; stdout carries JSON only
        if args.stage == "pt":
            args.steps, args.batch_size = args.steps or 30, args.batch_size or 8
            print(json.dumps(bench_pt(args)), file=out)
            return 0
        args.steps, args.batch_size = args.steps or 20, args.batch_size or 4
        modes = {"both": (True, False), "true": (True,), "false": (False,)}[args.packing]
        for packing in modes:
            print(json.dumps(bench_sft(args, packing)), file=out, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

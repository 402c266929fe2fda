"""Training throughput on the embedded tiny model, one JSON line per run.

    python benchmarks/train_throughput.py --stage pt  [--steps 30] [--block_size 128] [--batch_size 8]
    python benchmarks/train_throughput.py --stage sft [--steps 20] [--batch_size 4]
        (medtune packing; the same packed rows with an explicit 4-D block-diagonal mask, the non-leaking packing
         baseline users know; no packing, length-grouped)
    python benchmarks/train_throughput.py --stage dpo [--steps 10] [--batch_size 4]   (vs LoRA sft, each alone)

Prints tokens/s (every computed position), real tokens/s (excluding padding), samples/s, peak RSS in MB, wall
seconds and the real-token fraction of what was computed, for a fixed tiny configuration on the bundled data.
Peak RSS is the process's high-water mark, so for sft run each mode alone (--sft_modes) to compare memory.
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


class BlockDiagonalMaskCollator:
    """Baseline for comparison: the same packed rows with an explicit 4-D block-diagonal causal mask built in the
    collator -- the mechanism of the packing users know that does not leak attention (LLaMA-Factory's
    neat_packing), re-expressed here, not its code."""

    def __init__(self, packed_collator):
        self.packed = packed_collator

    def __call__(self, features):
        import torch

        batch = self.packed(features)
        positions = batch["position_ids"]
        segment = (positions == 0).cumsum(-1)  # a new conversation (or the padding tail) starts where positions restart
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones(positions.shape[1], positions.shape[1], dtype=torch.bool).tril()
        allowed = same & causal
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
        batch["attention_mask"] = mask[:, None]
        return batch


def bench_sft(args, mode: str) -> dict:
    """mode: packed (medtune), padded (length-grouped), packed_4d_mask (the baseline above)."""
    import medtune.stages.sft as sft_stage
    from medtune.config import parse_arguments
    from medtune.data import collators

    counters = []
    packing = mode != "padded"

    def counted(cls):
        def build(pad_token_id, **options):
            counters.append(CountingCollator(cls(pad_token_id, **options)))
            return counters[-1]
        return build

    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--config", str(REPO / "configs" / "sft_tiny.yaml"), "--output_dir", scratch, "--report_to", "none",
                "--max_steps", str(args.steps), "--per_device_train_batch_size", str(args.batch_size),
                "--validation_split_percentage", "0", "--save_strategy", "no", "--logging_steps", str(args.steps),
                "--packing", str(packing).lower()]
        configs = parse_arguments(sft_stage.ARGUMENT_TYPES, argv)
        originals = collators.PackedCollator, collators.PaddingCollator
        packed = originals[0]
        if mode == "packed_4d_mask":
            def packed(pad_token_id, inner=originals[0], **options):
                return BlockDiagonalMaskCollator(inner(pad_token_id, **options))
        collators.PackedCollator, collators.PaddingCollator = counted(packed), counted(originals[1])
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
        "mode": mode,
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


def bench_dpo(args, precompute: bool) -> dict:
    """LoRA DPO on the bundled pairs; computed and real tokens counted in TRL's own collator."""
    import torch
    from trl.trainer import dpo_trainer

    import medtune.stages.dpo as dpo_stage
    from medtune.config import parse_arguments

    counts = {"computed": 0, "real": 0, "paused": False}
    original = dpo_trainer.DataCollatorForPreference.torch_call
    original_precompute = dpo_trainer.DPOTrainer._precompute_ref_logps

    def counting(self, examples):
        batch = original(self, examples)
        if not counts["paused"]:
            counts["computed"] += batch["input_ids"].numel()
            counts["real"] += int(torch.as_tensor(batch["attention_mask"]).sum())
        return batch

    def precompute_uncounted(self, *a, **k):
        # the one-off reference pass before training is not part of the timed training steps
        counts["paused"] = True
        try:
            return original_precompute(self, *a, **k)
        finally:
            counts["paused"] = False

    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--output_dir", scratch, "--report_to", "none", "--max_steps", str(args.steps),
                "--per_device_train_batch_size", str(args.batch_size), "--max_length", str(args.max_length),
                "--validation_split_percentage", "0", "--save_strategy", "no", "--logging_steps", str(args.steps),
                "--precompute_ref_log_probs", str(precompute).lower(), "--data_cache_dir", scratch]
        configs = parse_arguments(dpo_stage.ARGUMENT_TYPES, argv)
        dpo_trainer.DataCollatorForPreference.torch_call = counting
        dpo_trainer.DPOTrainer._precompute_ref_logps = precompute_uncounted
        try:
            started = time.perf_counter()
            dpo_stage.run_dpo(*configs)
            wall = time.perf_counter() - started
        finally:
            dpo_trainer.DataCollatorForPreference.torch_call = original
            dpo_trainer.DPOTrainer._precompute_ref_logps = original_precompute
        state = json.loads((Path(scratch) / "trainer_state.json").read_text())
    runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    return {
        "stage": "dpo",
        "precompute_ref_log_probs": precompute,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "tokens_per_s": round(counts["computed"] / runtime, 1),
        "real_tokens_per_s": round(counts["real"] / runtime, 1),
        "real_token_fraction": round(counts["real"] / counts["computed"], 4),
        "train_runtime_s": round(runtime, 2),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def run_alone(*flags: str) -> dict:
    """Run one benchmark in a fresh process, so its peak RSS is its own."""
    import subprocess

    output = subprocess.run([sys.executable, __file__, *flags], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["pt", "sft", "dpo"], default="pt")
    parser.add_argument("--max_length", type=int, default=512, help="dpo: longest prompt+answer (sft uses the same).")
    parser.add_argument("--precompute", choices=["both", "true", "false"], default="both", help="dpo only.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps (default: pt 30, sft 20).")
    parser.add_argument("--block_size", type=int, default=128, help="pt only.")
    parser.add_argument("--batch_size", type=int, default=None, help="Per-device batch (default: pt 8, sft 4).")
    parser.add_argument("--sft_modes", default="packed,packed_4d_mask,padded",
                        help="sft only: comma-separated packed, packed_4d_mask (baseline), padded.")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints metric tables; stdout carries JSON only
        if args.stage == "pt":
            args.steps, args.batch_size = args.steps or 30, args.batch_size or 8
            print(json.dumps(bench_pt(args)), file=out)
            return 0
        if args.stage == "dpo":
            args.steps, args.batch_size = args.steps or 10, args.batch_size or 4
            if args.worker:
                print(json.dumps(bench_dpo(args, args.precompute == "true")), file=out)
                return 0
            common = ["--steps", str(args.steps), "--batch_size", str(args.batch_size)]
            sft_line = run_alone("--stage", "sft", "--sft_modes", "padded", *common)
            print(json.dumps(sft_line), file=out, flush=True)
            modes = {"both": ("false", "true"), "true": ("true",), "false": ("false",)}[args.precompute]
            for precompute in modes:
                line = run_alone("--stage", "dpo", "--worker", "--precompute", precompute,
                                 "--max_length", str(args.max_length), *common)
                line["rss_ratio_vs_lora_sft"] = round(line["peak_rss_mb"] / sft_line["peak_rss_mb"], 3)
                print(json.dumps(line), file=out, flush=True)
            return 0
        args.steps, args.batch_size = args.steps or 20, args.batch_size or 4
        for mode in args.sft_modes.split(","):
            print(json.dumps(bench_sft(args, mode)), file=out, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

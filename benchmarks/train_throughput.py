"""Training throughput, one JSON line per run, on the embedded tiny model and bundled data or on --model/--data.

    python benchmarks/train_throughput.py --stage pt  [--steps 120] [--block_size 128] [--batch_size 8]
    python benchmarks/train_throughput.py --stage sft [--epochs 2] [--batch_size 4]
        (medtune packing; the same packed rows with an explicit 4-D block-diagonal mask, the non-leaking packing
         baseline users know; no packing, length-grouped: every mode trains the same conversations for the same
         number of epochs, so every mode computes the same supervised tokens)
    python benchmarks/train_throughput.py --stage dpo [--steps 10] [--batch_size 4] [--pairs 500]
        (LoRA SFT, TRL's stock DPO path, medtune's DPO path: each in its own process; then a summary line)

pt and sft run each mode twice, each in its own process: medtune's path (the LM head at labelled positions only,
`--loss_only_labels true`, the default; LoRA layers fused with FastDropout (medtune.models.fast_lora); sft's packed rows attended per
conversation, `--varlen_attention true`) and today's path before it (transformers' own loss, peft's nn.Dropout,
packed rows under a block-diagonal mask), and print the ratio; sft ends with its best mode against today's best
mode. dpo compares medtune's path
(packed pair rows, reply-only head) with TRL's stock DPOTrainer forward (`--loss_only_labels false`, reference
forward in every step, no pre-pass), and its peak RSS with LoRA SFT on the same model, batch and length (the
prompt + chosen reply of the same pairs). Without --data it generates long pairs from the bundled text, about half
of them reaching max_length. `--precompute true` adds the reference pre-pass of both paths, timed.

Prints tokens/s (every computed position), real tokens/s (excluding padding), samples/s, peak RSS in MB, wall
seconds and the real-token fraction of what was computed. Peak RSS is the process's high-water mark, so every run
that reports memory runs in its own process.
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


@contextlib.contextmanager
def todays_path(baseline: bool):
    """The baseline runs train as medtune did before its label-only head: besides `--loss_only_labels false`,
    peft's own LoRA forward with its `nn.Dropout` in front of each adapter instead of `FastDropout` (same
    distribution, cheaper random mask on CPU) and the fused LoRA layers of `medtune.models.fast_lora`."""
    from medtune.models import fast_lora

    swap = fast_lora.use_fast_lora
    if baseline:
        fast_lora.use_fast_lora = lambda model: 0
    try:
        yield
    finally:
        fast_lora.use_fast_lora = swap


def model_and_data(args, data_option: str = "--train_file_dir") -> list[str]:
    """The --model / --data arguments, as the stage's options."""
    return ((["--model_name_or_path", args.model] if args.model else [])
            + ([data_option, args.data] if args.data else []))


def bench_pt(args, label_only: bool) -> dict:
    from medtune.config import parse_arguments
    from medtune.data.pretrain import prepare_block_datasets
    from medtune.models.loader import load_tokenizer, resolve_model_path
    from medtune.stages import pt

    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--config", str(REPO / "configs" / "pt_tiny.yaml"), "--output_dir", scratch, "--report_to", "none",
                "--max_steps", str(args.steps), "--block_size", str(args.block_size), "--per_device_train_batch_size",
                str(args.batch_size), "--validation_split_percentage", "0", "--save_strategy", "no",
                "--logging_steps", str(args.steps), "--loss_only_labels", str(label_only).lower(),
                *model_and_data(args)]
        configs = parse_arguments(pt.ARGUMENT_TYPES, argv)
        # Tokenize outside the timed region (cached afterwards), as a real re-run would.
        tokenizer = load_tokenizer(resolve_model_path(args.model))
        train, _, _ = prepare_block_datasets(configs[2], tokenizer)
        started = time.perf_counter()
        with todays_path(not label_only):
            pt.run_pt(*configs)
        wall = time.perf_counter() - started
        state = json.loads((Path(scratch) / "trainer_state.json").read_text())
    runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    samples = args.steps * args.batch_size
    computed = samples * args.block_size
    fraction = real_token_fraction(train, samples)
    return {
        "stage": "pt",
        "loss_only_labels": label_only,
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
    """Wraps a collator to count every computed position, the real (non-padding) tokens among them and the
    samples (packed rows or conversations)."""

    def __init__(self, inner):
        self.inner, self.computed, self.real, self.samples = inner, 0, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.computed += batch["input_ids"].numel()
        self.real += sum(len(f["input_ids"]) for f in features)
        self.samples += len(features)
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


def bench_sft(args, mode: str, label_only: bool = True) -> dict:
    """mode: packed (medtune), padded (length-grouped), packed_4d_mask (the baseline above), for `args.epochs` over
    the conversations, or `args.steps` optimizer steps when given. With `args.sft_companion` (dpo's memory
    reference): no tiny config, the default LoRA, rows up to max_length."""
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
        recipe = (["--model_max_length", str(args.max_length)] if args.sft_companion
                  else ["--config", str(REPO / "configs" / "sft_tiny.yaml")])
        length = ["--max_steps", str(args.steps)] if args.steps else ["--max_steps", "-1", "--num_train_epochs",
                                                                      str(args.epochs)]
        argv = [*recipe, "--output_dir", scratch, "--report_to", "none", "--data_cache_dir", scratch, *length,
                "--per_device_train_batch_size", str(args.batch_size),
                "--validation_split_percentage", "0", "--save_strategy", "no",
                "--logging_steps", str(args.steps or 1_000_000),
                "--packing", str(packing).lower(), "--loss_only_labels", str(label_only).lower(),
                "--varlen_attention", str(label_only).lower(),
                *model_and_data(args)]
        configs = parse_arguments(sft_stage.ARGUMENT_TYPES, argv)
        originals = collators.PackedCollator, collators.PaddingCollator
        packed = originals[0]
        if mode == "packed_4d_mask":
            def packed(pad_token_id, inner=originals[0], **options):
                return BlockDiagonalMaskCollator(inner(pad_token_id, **options))
        collators.PackedCollator, collators.PaddingCollator = counted(packed), counted(originals[1])
        try:
            started = time.perf_counter()
            with todays_path(not label_only):
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
        "loss_only_labels": label_only,
        "steps": state["global_step"],
        "epochs": round(state["epoch"], 3),
        "batch_size": args.batch_size,
        "real_tokens": counter.real,
        "tokens_per_s": round(counter.computed / runtime, 1),
        "real_tokens_per_s": round(counter.real / runtime, 1),
        "real_token_fraction": round(counter.real / counter.computed, 4),
        "samples_per_s": round(counter.samples / runtime, 2),
        "train_runtime_s": round(runtime, 2),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def bench_dpo(args, precompute: bool, label_only: bool) -> dict:
    """LoRA DPO; real tokens (prompt + chosen + rejected of each pair, the same count for both paths) and computed
    positions counted in the collators, the reference pre-pass timed on its own."""
    from trl.trainer import dpo_trainer

    import medtune.stages.dpo as dpo_stage
    from medtune.config import parse_arguments
    from medtune.stages import pair_packing

    counts = {"computed": 0, "real": 0, "paused": False, "prepass_s": 0.0}
    original = dpo_trainer.DataCollatorForPreference.torch_call
    original_packed = pair_packing.PackedPairCollator.__call__
    original_precompute = dpo_trainer.DPOTrainer._precompute_ref_logps

    def counting(self, examples):
        batch = original(self, examples)
        if not counts["paused"]:
            counts["computed"] += batch["input_ids"].numel()
            counts["real"] += sum(len(e["prompt_ids"]) + len(e["chosen_ids"]) + len(e["rejected_ids"])
                                  for e in examples)
        return batch

    def counting_packed(self, examples):
        batch = original_packed(self, examples)
        if not counts["paused"]:  # the packed rows are what is computed, not the two-row batch counted above
            counts["computed"] += batch["packed_input_ids"].numel() - batch["input_ids"].numel()
        return batch

    def timed_precompute(self, *a, **k):
        # the one-off reference pass before training is timed apart from the training steps
        counts["paused"] = True
        started = time.perf_counter()
        try:
            return original_precompute(self, *a, **k)
        finally:
            counts["paused"] = False
            counts["prepass_s"] += time.perf_counter() - started

    with tempfile.TemporaryDirectory() as scratch:
        argv = ["--output_dir", scratch, "--report_to", "none", "--max_steps", str(args.steps),
                "--per_device_train_batch_size", str(args.batch_size), "--max_length", str(args.max_length),
                "--validation_split_percentage", "0", "--save_strategy", "no", "--logging_steps", str(args.steps),
                "--precompute_ref_log_probs", str(precompute).lower(), "--data_cache_dir", scratch,
                "--loss_only_labels", str(label_only).lower(), *model_and_data(args)]
        configs = parse_arguments(dpo_stage.ARGUMENT_TYPES, argv)
        dpo_trainer.DataCollatorForPreference.torch_call = counting
        pair_packing.PackedPairCollator.__call__ = counting_packed
        dpo_trainer.DPOTrainer._precompute_ref_logps = timed_precompute
        try:
            started = time.perf_counter()
            with todays_path(not label_only):
                dpo_stage.run_dpo(*configs)
            wall = time.perf_counter() - started
        finally:
            dpo_trainer.DataCollatorForPreference.torch_call = original
            pair_packing.PackedPairCollator.__call__ = original_packed
            dpo_trainer.DPOTrainer._precompute_ref_logps = original_precompute
        state = json.loads((Path(scratch) / "trainer_state.json").read_text())
    runtime = next(e["train_runtime"] for e in state["log_history"] if "train_runtime" in e)
    return {
        "stage": "dpo",
        "path": "medtune" if label_only else "trl_stock",
        "precompute_ref_log_probs": precompute,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "tokens_per_s": round(counts["computed"] / runtime, 1),
        "real_tokens_per_s": round(counts["real"] / runtime, 1),
        "real_tokens_per_s_with_prepass": round(counts["real"] / (runtime + counts["prepass_s"]), 1),
        "real_token_fraction": round(counts["real"] / counts["computed"], 4),
        "prepass_s": round(counts["prepass_s"], 2),
        "train_runtime_s": round(runtime, 2),
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def corpus_passages() -> list[str]:
    """Paragraph-sized passages of the bundled pretraining text."""
    passages = []
    for path in sorted((REPO / "data" / "pretrain").glob("*.txt")):
        passages += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 80]
    return passages


def long_preference_pairs(folder: Path, pairs: int, seed: int = 0) -> Path:
    """`pairs` preference pairs cut from the bundled text, long enough that about half reach 512 tokens of the
    tiny tokenizer (a question over a passage of 60-450 characters, replies of 300-800 characters)."""
    import random

    rng = random.Random(seed)
    text = "".join(corpus_passages())

    def cut(low: int, high: int) -> str:
        size = rng.randint(low, high)
        start = rng.randrange(0, len(text) - size)
        return text[start:start + size]

    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "long_pairs.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(pairs):
            record = {"system": "", "history": [], "question": f"请根据资料回答：{cut(60, 450)}",
                      "response_chosen": cut(300, 800), "response_rejected": cut(300, 800)}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return folder


def conversations_from_pairs(pairs_dir: str, folder: Path) -> Path:
    """SFT conversations of the same pairs (prompt + chosen reply): SFT at the same length, for the memory ratio."""
    from medtune.data.loading import load_records

    pairs, _ = load_records(pairs_dir, "preference")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "conversations.jsonl", "w", encoding="utf-8") as handle:
        for pair in pairs:
            messages = [*pair.prompt, {"role": "assistant", "content": pair.chosen}]
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return folder


def run_alone(*flags: str) -> dict:
    """Run one benchmark in a fresh process, so its peak RSS is its own."""
    import subprocess

    output = subprocess.run([sys.executable, __file__, *flags], check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def compare_dpo(args, out) -> None:
    """SFT, TRL's stock DPO and medtune's DPO, each in its own process, then the ratios."""
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or str(long_preference_pairs(Path(scratch) / "pairs", args.pairs))
        shared = ["--steps", str(args.steps), "--batch_size", str(args.batch_size), "--max_length",
                  str(args.max_length), *(["--model", args.model] if args.model else [])]
        sft_data = conversations_from_pairs(data, Path(scratch) / "sft")
        sft = run_alone("--stage", "sft", "--worker", "--sft_modes", "padded", "--data", str(sft_data), *shared)
        print(json.dumps(sft), file=out, flush=True)
        lines = {}
        modes = [("false", "false"), ("false", "true")]
        if args.precompute == "true":
            modes += [("true", "false"), ("true", "true")]
        for precompute, label_only in modes:
            line = run_alone("--stage", "dpo", "--worker", "--precompute", precompute, "--loss_only_labels",
                             label_only, "--data", data, *shared)
            line["rss_ratio_vs_lora_sft"] = round(line["peak_rss_mb"] / sft["peak_rss_mb"], 3)
            lines[precompute, label_only] = line
            print(json.dumps(line), file=out, flush=True)
    stock, ours = lines["false", "false"], lines["false", "true"]
    summary = {"stage": "dpo", "summary": True, "data": args.data or f"generated long pairs ({args.pairs})",
               "dpo_speedup_vs_trl_stock": round(ours["real_tokens_per_s"] / stock["real_tokens_per_s"], 3),
               "dpo_rss_vs_sft": ours["rss_ratio_vs_lora_sft"],
               "trl_stock_rss_vs_sft": stock["rss_ratio_vs_lora_sft"]}
    if args.precompute == "true":
        stock_pre, ours_pre = lines["true", "false"], lines["true", "true"]
        summary["prepass_vs_trl_prepass"] = round(ours_pre["prepass_s"] / stock_pre["prepass_s"], 3)
        summary["precompute_speedup_vs_trl_stock_with_prepass"] = round(
            ours_pre["real_tokens_per_s_with_prepass"] / stock["real_tokens_per_s"], 3)
    print(json.dumps(summary), file=out, flush=True)


def passed_on(args) -> list[str]:
    """This run's settings, for a run of one path in its own process (the first run in a process warms caches
    and the allocator for the second, which would bias the ratio)."""
    return ["--stage", args.stage, *(["--steps", str(args.steps)] if args.steps else []), "--epochs", str(args.epochs),
            "--batch_size", str(args.batch_size), "--block_size",
            str(args.block_size), *(["--model", args.model] if args.model else []),
            *(["--data", args.data] if args.data else [])]


def ratio_line(stage: str, baseline: dict, ours: dict, **extra) -> dict:
    return {"stage": stage, "summary": True, **extra,
            "speedup_vs_todays_path": round(ours["real_tokens_per_s"] / baseline["real_tokens_per_s"], 3)}


def best_mode_line(lines: list[dict]) -> dict:
    """sft: medtune's best mode (packed or padded, today's path off) against today's best mode (any of the three,
    the explicit 4-D mask included), in real tokens/s over the same conversations."""
    def best(rows):
        top = max(rows, key=lambda row: row["real_tokens_per_s"])
        return {"mode": top["mode"], "real_tokens_per_s": top["real_tokens_per_s"]}

    todays = best([row for row in lines if not row["loss_only_labels"]])
    ours = best([row for row in lines if row["loss_only_labels"] and row["mode"] != "packed_4d_mask"])
    return {"stage": "sft", "summary": True, "best_todays_mode": todays, "best_medtune_mode": ours,
            "speedup_vs_best_todays_mode": round(ours["real_tokens_per_s"] / todays["real_tokens_per_s"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["pt", "sft", "dpo"], default="pt")
    parser.add_argument("--model", default=None, help="A local model folder (default: the embedded tiny GLM-4).")
    parser.add_argument("--data", default=None, help="A data folder for the stage (pt: text, sft: conversations, "
                                                     "dpo: pairs). Default: bundled data; dpo: generated long pairs.")
    parser.add_argument("--pairs", type=int, default=500, help="dpo without --data: pairs generated.")
    parser.add_argument("--max_length", type=int, default=512, help="dpo: longest prompt+answer (sft uses the same).")
    parser.add_argument("--precompute", choices=["true", "false"], default="false",
                        help="dpo: also run both paths with the reference pre-pass (over every pair), timed.")
    parser.add_argument("--loss_only_labels", choices=["both", "true", "false"], default="both",
                        help="pt/sft: the LM head at labelled positions only, transformers' own loss, or both.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=None,
                        help="Optimizer steps (default: pt 120, dpo 10; sft: --epochs instead).")
    parser.add_argument("--epochs", type=float, default=2.0,
                        help="sft without --steps: epochs over the conversations, the same for every mode.")
    parser.add_argument("--block_size", type=int, default=128, help="pt only.")
    parser.add_argument("--batch_size", type=int, default=None, help="Per-device batch (default: pt 8, sft/dpo 4).")
    parser.add_argument("--sft_modes", default="packed,packed_4d_mask,padded",
                        help="sft only: comma-separated packed, packed_4d_mask (baseline), padded.")
    args = parser.parse_args()
    args.sft_companion = args.stage == "sft" and args.worker
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    out = sys.stdout
    flags = {"both": (False, True), "true": (True,), "false": (False,)}[args.loss_only_labels]
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints metric tables; stdout carries JSON only
        if args.stage == "pt":
            args.steps, args.batch_size = args.steps or 120, args.batch_size or 8
            if len(flags) == 1:
                print(json.dumps(bench_pt(args, flags[0])), file=out)
                return 0
            lines = [run_alone(*passed_on(args), "--loss_only_labels", str(flag).lower()) for flag in flags]
            for line in lines:
                print(json.dumps(line), file=out, flush=True)
            print(json.dumps(ratio_line("pt", *lines)), file=out)
            return 0
        if args.stage == "dpo":
            args.steps, args.batch_size = args.steps or 10, args.batch_size or 4
            if args.worker:
                print(json.dumps(bench_dpo(args, args.precompute == "true", args.loss_only_labels == "true")),
                      file=out)
                return 0
            compare_dpo(args, out)
            return 0
        args.batch_size = args.batch_size or 4
        if args.worker:  # dpo's memory reference (its --steps)
            print(json.dumps(bench_sft(args, "padded")), file=out)
            return 0
        runs = []
        for mode in args.sft_modes.split(","):
            if len(flags) == 1:
                print(json.dumps(bench_sft(args, mode, flags[0])), file=out, flush=True)
                continue
            lines = [run_alone(*passed_on(args), "--sft_modes", mode, "--loss_only_labels", str(flag).lower())
                     for flag in flags]
            for line in lines:
                print(json.dumps(line), file=out, flush=True)
            print(json.dumps(ratio_line("sft", *lines, mode=mode)), file=out, flush=True)
            runs += lines
        if {"packed", "padded"} & {row["mode"] for row in runs}:
            print(json.dumps(best_mode_line(runs)), file=out, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

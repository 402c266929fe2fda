"""LoRA SFT throughput and MFU on a CUDA GPU, for models of real shape with random weights (no hub access).

    python benchmarks/gpu_train.py [--shapes qwen2.5-0.5b,glm4-9b-4layers] [--steps 30] [--warmup 5]

For each shape a randomly initialised bf16 model is saved with the embedded tiny model's tokenizer (its ids fit
the real vocabulary) and trained by `medtune sft` itself (LoRA r=8 on every linear layer, bf16, the bundled
conversations, model_max_length 2048): once with packing (rows of up to 2048 tokens; flash-attention's varlen
path when flash-attn is installed, else sdpa with per-conversation masking) and once without (length-grouped
padded batches). One JSON line per run; the whole script stays under 5 minutes on an H100/H200. Without CUDA it
prints one JSON line saying so and exits 0.

MFU (model FLOPs utilisation) = model FLOPs per token × real tokens/s ÷ the GPU's peak dense bf16 FLOP/s, where

    model FLOPs per token = k · 2 · (N_linear + V·h) + 3 · 4 · L · nq · d · c

N_linear is the decoder's linear weights and V·h the output head (medtune.estimate.Architecture), k = 2 for LoRA
(forward + the input-gradient matmuls; the frozen base has no weight gradients; the rank-8 adapters are left out)
or 3 for full fine-tuning, and the attention term is the two L×L-shaped matmuls (QKᵀ and AV, 2 FLOPs per
multiply-add) over the c positions each token attends to (measured: the mean causal context of the real tokens,
per conversation), forward plus a backward twice as costly. Padding and the embedding lookup count as no
useful work. Timing and tokens cover the steps after --warmup (CUDA-synchronised).

Peak dense bf16 (tensor core) FLOP/s used, by device name (override with --peak_tflops):
    H200 989 T · H100 SXM 989 T · H100 PCIe 756 T · H800 989 T · H20 148 T · A100 / A800 312 T · L40S 362 T ·
    L40 181 T · A10 125 T · L4 121 T · RTX 4090 165 T (NVIDIA datasheets, without sparsity)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEAK_BF16_TFLOPS = {"H200": 989, "H100 PCIe": 756, "H100": 989, "H800": 989, "H20": 148, "A100": 312, "A800": 312,
                    "L40S": 362, "L40": 181, "A10": 125, "L4": 121, "RTX 4090": 165}
QWEN25_05B = {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
              "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6}
SHAPES = {
    "qwen2.5-0.5b": ("qwen2", QWEN25_05B),
    "glm4-9b-4layers": ("glm4", {**json.loads((REPO / "tests" / "data" / "configs" / "glm-4-9b-chat-hf.json")
                                             .read_text()), "num_hidden_layers": 4}),
    # for a CPU smoke run of this script (--allow_cpu): two small layers
    "tiny-test": ("glm4", {"model_type": "glm", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 8192,
                           "attention_bias": True, "partial_rotary_factor": 0.5, "pad_token_id": 0}),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def peak_tflops(device_name: str) -> float | None:
    # longest name first, so "H100 PCIe" wins over "H100"
    for name in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if name in device_name:
            return float(PEAK_BF16_TFLOPS[name])
    return None


def build_random_model(shape: str, folder: Path, dtype) -> dict:
    """A random model of `shape` saved with the tokenizer of the embedded tiny model of its family."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medtune.models.tiny import default_model_dir

    arch, config = SHAPES[shape]
    tiny = default_model_dir(arch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=dtype)
    model.save_pretrained(folder)
    del model
    for name in TOKENIZER_FILES:
        if (tiny / name).is_file():
            shutil.copy(tiny / name, folder / name)
    return config


def step_timer():
    """A Trainer callback recording CUDA-synchronised times at the end of every step."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    return StepTimer()


class RecordingCollator:
    """Wraps medtune's collator; records per batch the computed positions, real tokens and attended context."""

    def __init__(self, inner):
        self.inner, self.batches = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        real = sum(len(f["input_ids"]) for f in features)
        if "position_ids" in batch:  # packed: each token attends to its own conversation up to itself
            context = sum(int(p) + 1 for f in features for p in f["position_ids"])
        else:
            context = sum(n * (n + 1) // 2 for n in (len(f["input_ids"]) for f in features))
        self.batches.append((batch["input_ids"].numel(), real, context))
        return batch


def run(shape: str, packing: bool, args, dtype_name: str) -> dict:
    import torch
    import transformers.trainer
    from transformers.utils import is_flash_attn_2_available

    import medtune.stages.sft as sft_stage
    from medtune.config import parse_arguments
    from medtune.data import collators
    from medtune.estimate import Architecture

    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as scratch:
        model_dir, out = Path(scratch) / "model", Path(scratch) / "out"
        config = build_random_model(shape, model_dir, getattr(torch, dtype_name))
        argv = ["--model_name_or_path", str(model_dir), "--output_dir", str(out), "--report_to", "none",
                "--max_steps", str(args.steps), "--per_device_train_batch_size",
                str(args.packed_batch if packing else args.padded_batch), "--packing", str(packing).lower(),
                "--model_max_length", str(args.seq), "--validation_split_percentage", "0", "--save_strategy", "no",
                "--logging_steps", str(args.steps), "--bf16", str(cuda).lower(), "--torch_dtype", dtype_name,
                "--attn_implementation", "flash_attention_2" if cuda else "sdpa", "--lora_rank", "8",
                "--lora_dropout", "0.05", "--data_cache_dir", scratch]
        configs = parse_arguments(sft_stage.ARGUMENT_TYPES, argv)
        timer, recorders = step_timer(), []
        originals = collators.PackedCollator, collators.PaddingCollator

        def recorded(cls):
            def build(*a, **k):
                recorders.append(RecordingCollator(cls(*a, **k)))
                return recorders[-1]
            return build

        collators.PackedCollator, collators.PaddingCollator = recorded(originals[0]), recorded(originals[1])
        transformers.trainer.DEFAULT_CALLBACKS.append(timer)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            sft_stage.run_sft(*configs)
        finally:
            collators.PackedCollator, collators.PaddingCollator = originals
            transformers.trainer.DEFAULT_CALLBACKS.remove(timer)
    # the batches of the timed steps (warmup+1 .. steps); the dataloader may have fetched one more ahead
    timed = recorders[0].batches[args.warmup:args.steps]
    seconds = timer.times[args.steps - 1] - timer.times[args.warmup - 1]
    computed, real, context = (sum(column) for column in zip(*timed))
    arch = Architecture.from_config(config)
    attention_per_context = 3 * 4 * arch.layers * arch.heads * arch.head_dim
    model_flops = 2 * 2 * (arch.linear_weights() + arch.vocab * arch.hidden) * real + attention_per_context * context
    device = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or (peak_tflops(device) if cuda else None)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {
        "shape": shape,
        "packing": packing,
        "device": device,
        "parameters": arch.parameters(),
        "attn_implementation": "flash_attention_2" if cuda and is_flash_attn_2_available() else "sdpa",
        "steps_timed": args.steps - args.warmup,
        "tokens_per_s": round(computed / seconds, 1),
        "real_tokens_per_s": round(real / seconds, 1),
        "real_token_fraction": round(real / computed, 4),
        "model_tflops_per_s": round(model_flops / seconds / 1e12, 2),
        "peak_bf16_tflops": peak,
        "mfu": round(model_flops / seconds / (peak * 1e12), 4) if peak else None,
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "seconds_timed": round(seconds, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="qwen2.5-0.5b,glm4-9b-4layers", help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the timing (default 5)")
    parser.add_argument("--seq", type=int, default=2048, help="model_max_length, and the packed row length")
    parser.add_argument("--packed_batch", type=int, default=4, help="packed rows per step (default 4)")
    parser.add_argument("--padded_batch", type=int, default=16, help="conversations per step without packing")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the GPU's peak dense bf16 TFLOP/s")
    parser.add_argument("--allow_cpu", action="store_true", help="smoke-run on CPU in float32 (tests only)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print(json.dumps({"cuda": False, "skipped": "no CUDA GPU: nothing measured"}))
        return 0
    if not 0 < args.warmup < args.steps:
        parser.error("--warmup must be between 0 and --steps (exclusive)")
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints metric tables; stdout carries JSON only
        for shape in args.shapes.split(","):
            for packing in (True, False):
                print(json.dumps(run(shape, packing, args, dtype)), file=out, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

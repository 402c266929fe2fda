"""Peak memory of `medtune merge` against the size of the weights, one JSON line.

    python benchmarks/merge_memory.py [--hidden_size 1024] [--layers 12] [--dtype bfloat16] [--src PATH]

Builds a random Llama-layout model in `--dtype` (about 150 M parameters by default) and a LoRA adapter with non-zero
weights on every linear layer, then measures, each in its own process, the peak RSS of
  runtime  importing torch, transformers, peft and medtune (the floor every path pays),
  load     loading the base once in its dtype and running it (one copy of the weights, touched),
  merge    `medtune merge` of the adapter into the base (with its reload-and-compare check).
It prints the weights' size and (merge - runtime) / weights and (load - runtime) / weights: about 1 means one copy
of the model in memory. `--src` runs the merge from another source tree (e.g. an older checkout) for comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would inherit this process's peak.
PEAK = "import re; print('PEAK_KB', re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
RUNTIME = "import torch, transformers, peft, medtune.stages.merge, medtune.models.loader"


def build(folder: Path, hidden_size: int, layers: int, dtype_name: str) -> tuple[Path, Path, int]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from medtune.models.tiny import build_tiny_model

    tiny = build_tiny_model("llama", folder / "tiny")
    config = AutoConfig.from_pretrained(tiny)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = hidden_size, hidden_size * 11 // 4, layers
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = hidden_size // 64, hidden_size // 128, 64
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype_name))
    base = folder / "base"
    model.save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(base)
    weights = (base / "model.safetensors").stat().st_size
    model.name_or_path = model.config._name_or_path = str(base)  # the base the adapter records (merge checks it)
    adapter = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.01)
    adapter.save_pretrained(folder / "adapter")
    return base, folder / "adapter", weights


def peak_mb(code: str, src: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(src), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run([sys.executable, "-c", f"{code}\n{PEAK}"], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    line = next(line for line in result.stdout.splitlines() if line.startswith("PEAK_KB"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden_size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--src", default=str(REPO / "src"), help="Source tree the merge runs from.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        base, adapter, weights = build(Path(scratch), args.hidden_size, args.layers, args.dtype)
        src = Path(args.src)
        runtime = peak_mb(RUNTIME, src)
        # a forward pass touches every weight (loading alone may only map the file)
        load = peak_mb(f"{RUNTIME}\nmodel = medtune.models.loader.load_model({str(base)!r}, torch_dtype={args.dtype!r})"
                       "\nwith torch.no_grad(): model(input_ids=torch.tensor([[1, 2, 3]]))", src)
        merge = peak_mb(f"{RUNTIME}\nfrom medtune import cli\nassert cli.main(['merge', '--lora_model', "
                        f"{str(adapter)!r}, '--base_model', {str(base)!r}, '--output_dir', "
                        f"{str(Path(scratch) / 'merged')!r}]) == 0", src)
        merged = sum(p.stat().st_size for p in (Path(scratch) / "merged").glob("*.safetensors"))
    weights_mb = weights / 2**20
    print(json.dumps({
        "dtype": args.dtype, "src": str(src), "weights_mb": round(weights_mb, 1),
        "merged_weights_mb": round(merged / 2**20, 1), "runtime_peak_mb": round(runtime, 1),
        "load_peak_mb": round(load, 1), "merge_peak_mb": round(merge, 1),
        "load_over_weights": round((load - runtime) / weights_mb, 2),
        "merge_over_weights": round((merge - runtime) / weights_mb, 2),
    }))


if __name__ == "__main__":
    main()

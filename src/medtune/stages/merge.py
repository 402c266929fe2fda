"""`medtune merge`: fold a LoRA adapter into its base model and save a standalone model folder.

The result is checked, not assumed: the merged model is reloaded from disk and its logits on a probe
conversation must equal base+adapter logits (float32, `check_tolerance`), otherwise nothing is left behind.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from medtune.config import MergeArguments
from medtune.errors import ConfigError, MedtuneError

logger = logging.getLogger(__name__)

ARGUMENT_TYPES = (MergeArguments,)
DESCRIPTION = "Merge a LoRA adapter into its base model (safetensors + tokenizer + chat template + generation config)."
PROBE_MESSAGES = [
    {"role": "system", "content": "你是一名谨慎的医生助手。"},
    {"role": "user", "content": "孕妇发热可以吃什么药？"},
    {"role": "assistant", "content": "对乙酰氨基酚在常规剂量下通常可用，四环素类应避免。"},
]


def adapter_base(lora_model: Path) -> str | None:
    config = lora_model / "adapter_config.json"
    if not config.is_file():
        raise MedtuneError(f"{lora_model}: not a LoRA adapter folder (no adapter_config.json)")
    return json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")


def _same_folder(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def probe_inputs(tokenizer):
    import torch

    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=False)
    else:
        text = "\n".join(m["content"] for m in PROBE_MESSAGES)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


def run_merge(args: MergeArguments) -> Path:
    import torch
    from peft import PeftModel

    from medtune.models.loader import load_model, load_tokenizer, resolve_dtype

    lora_dir, output_dir = Path(args.lora_model), Path(args.output_dir)
    base = args.base_model or adapter_base(lora_dir)
    if not base:
        raise ConfigError(f"{lora_dir}: the adapter does not record its base model; pass --base_model")
    adapter_base(lora_dir)  # validates the adapter folder even when --base_model is given
    for protected, what in ((Path(base), "base model"), (lora_dir, "adapter")):
        if _same_folder(output_dir, protected):
            raise ConfigError(f"--output_dir {output_dir} is the {what}'s folder; merge never overwrites its inputs")
    if output_dir.exists() and any(output_dir.iterdir()):
        raise ConfigError(f"--output_dir {output_dir} is not empty; choose a new folder")

    tokenizer_source = args.tokenizer_path or (str(lora_dir) if (lora_dir / "tokenizer_config.json").is_file() else base)
    tokenizer = load_tokenizer(tokenizer_source, args.trust_remote_code)
    # Merge and check in float32 on the CPU: no GPU memory spike (device_map="auto" OOMs, MedicalGPT #251) and
    # no rounding hiding a real mismatch. The requested dtype applies only to the saved weights.
    model = load_model(base, torch_dtype="float32", trust_remote_code=args.trust_remote_code)
    save_dtype = model.config.dtype if args.torch_dtype == "auto" else resolve_dtype(args.torch_dtype)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(model, str(lora_dir))
    model.eval()
    probe = probe_inputs(tokenizer)
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        merged = model.merge_and_unload()
        output_dir.mkdir(parents=True, exist_ok=True)
        merged.save_pretrained(str(output_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(output_dir))
        reloaded = load_model(str(output_dir), torch_dtype="float32", trust_remote_code=args.trust_remote_code)
        difference = (reloaded(input_ids=probe).logits - expected).abs().max().item()
    if not difference <= args.check_tolerance:
        shutil.rmtree(output_dir, ignore_errors=True)
        raise MedtuneError(f"merged model's logits differ from base+adapter by {difference:.3g} "
                           f"(> {args.check_tolerance}); nothing was written")
    if save_dtype not in (None, torch.float32):
        reloaded.to(save_dtype).save_pretrained(str(output_dir), safe_serialization=True)
    report = {"base_model": base, "lora_model": str(lora_dir), "max_abs_logit_difference": difference,
              "tolerance": args.check_tolerance, "probe_tokens": int(probe.shape[1]), "saved_dtype": str(save_dtype)}
    (output_dir / "merge_check.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    logger.info("merged %s into %s -> %s (max |logit difference| %.2e)", lora_dir, base, output_dir, difference)
    return output_dir

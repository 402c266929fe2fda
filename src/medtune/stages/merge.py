"""`medtune merge`: fold a LoRA adapter into its base model and save a standalone model folder.

- The adapter must belong to the base: the base it records (architecture and sizes), its tokenizer and every one of
  its LoRA weights are checked before anything is written (peft itself silently drops weights with no module).
- The merged model keeps the base's dtype (or `--torch_dtype`). The base is loaded once in that dtype and peft merges
  layer by layer (each delta computed in float32 from float32 LoRA weights, then rounded into the weight), so memory
  stays at about one copy of the model plus one layer.
- The result is checked, not assumed: it is reloaded from disk and its logits on a probe conversation must match
  base+adapter. Both sides are computed in float32 from the stored weights, so only the single rounding of the merged
  weights into bf16/fp16 remains, and the tolerance allows for exactly that (see `check_tolerance`).
- Crash safe: everything is written to a hidden sibling folder that is renamed to `--output_dir` only when complete;
  a failed or interrupted merge leaves `--output_dir` as it was, and the next run removes the leftover.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
from pathlib import Path

from medtune.config import MergeArguments, ModelArguments
from medtune.errors import (
    ConfigError,
    MedtuneError,
    byte_size,
    failed_write_reported,
    file_named_by,
    free_space,
    is_disk_full,
)

logger = logging.getLogger(__name__)

ARGUMENT_TYPES = (ModelArguments, MergeArguments)
DESCRIPTION = "Merge a LoRA adapter into its base model (safetensors + tokenizer + chat template + generation config)."
PROBE_MESSAGES = [
    {"role": "system", "content": "你是一名谨慎的医生助手。"},
    {"role": "user", "content": "孕妇发热可以吃什么药？"},
    {"role": "assistant", "content": "对乙酰氨基酚在常规剂量下通常可用，四环素类应避免。"},
]
# What makes two checkpoints the same model for an adapter: the same architecture and every size a LoRA weight
# or a layer index depends on.
SAME_MODEL_KEYS = ("model_type", "architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")
# Headroom for float32 rounding noise on top of the saved dtype's own rounding (see `logit_tolerance`).
ROUNDING_STEPS = 4


# -- the adapter and its base -------------------------------------------------------------------------------------

def read_adapter_config(lora_model: Path) -> dict:
    config = lora_model / "adapter_config.json"
    if not config.is_file():
        raise MedtuneError(f"{lora_model}: not a LoRA adapter folder (no adapter_config.json)")
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MedtuneError(f"{config}: not a valid adapter config ({exc})") from None


def check_adapter_base(lora_model: Path, adapter_config: dict, base: str, base_config: dict) -> None:
    """Refuse an adapter trained on another model: same hidden size is not enough (a Qwen2 adapter fits a Llama
    base shape for shape and would merge "successfully" into nonsense)."""
    trained_class = (adapter_config.get("auto_mapping") or {}).get("base_model_class")
    architectures = base_config.get("architectures") or []
    if trained_class and architectures and trained_class not in architectures:
        raise ConfigError(f"{lora_model}: the adapter was trained on a {trained_class}, but {base} is a "
                          f"{', '.join(architectures)}; pass the --base_model it was trained on")
    recorded = adapter_config.get("base_model_name_or_path")
    if not recorded or _same_folder(Path(recorded), Path(base)):
        return
    from medtune.models.loader import read_model_config

    recorded_config = read_model_config(recorded) if Path(recorded).is_dir() else {}
    if not recorded_config:
        logger.warning("%s was trained on %s, which is not here; merging into %s after checking that its "
                       "tokenizer and every LoRA weight fit", lora_model, recorded, base)
        return
    for key in SAME_MODEL_KEYS:
        if recorded_config.get(key) != base_config.get(key):
            raise ConfigError(f"{lora_model}: the adapter was trained on {recorded} ({key} "
                              f"{recorded_config.get(key)}), not on {base} ({key} {base_config.get(key)}); pass "
                              "the --base_model it was trained on")


def check_tokenizer_belongs_to_base(tokenizer, tokenizer_source: str, base: str, trust_remote_code: bool) -> None:
    """The tokenizer saved beside the merged weights must be the base's (added tokens allowed): another model's
    tokenizer would turn every prompt into the wrong ids."""
    if _same_folder(Path(tokenizer_source), Path(base)) or not (Path(base) / "tokenizer_config.json").is_file():
        return
    from medtune.models.loader import load_tokenizer

    base_vocabulary = load_tokenizer(base, trust_remote_code).get_vocab()
    vocabulary = tokenizer.get_vocab()
    moved = sum(vocabulary.get(token) != index for token, index in base_vocabulary.items())
    if moved:
        raise ConfigError(f"{tokenizer_source}: this tokenizer is not {base}'s ({moved} of {len(base_vocabulary)} "
                          "base tokens missing or with other ids): the adapter belongs to another model; pass the "
                          "--base_model it was trained on")


def adapter_weight_names(lora_model: Path) -> set[str]:
    """The tensor names stored in the adapter file (read from the header, no weights loaded)."""
    weights = lora_model / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as handle:
            return set(handle.keys())
    weights = lora_model / "adapter_model.bin"
    if weights.is_file():
        import torch

        return set(torch.load(str(weights), map_location="meta", weights_only=True))
    raise MedtuneError(f"{lora_model}: no adapter_model.safetensors (or adapter_model.bin) in the adapter folder")


def attach_adapter(model, lora_model: Path, base: str):
    """The base with the adapter attached (unmerged), after proving that every stored LoRA weight was placed."""
    from peft import PeftModel, get_peft_model_state_dict

    stored = adapter_weight_names(lora_model)
    try:
        # autocast_adapter_dtype keeps the LoRA weights in float32 on a bf16/fp16 base: each delta is computed in
        # float32 and rounded once, into the weight.
        model = PeftModel.from_pretrained(model, str(lora_model), autocast_adapter_dtype=True)
    except RuntimeError as exc:
        mismatch = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
        if mismatch is None:
            raise
        raise ConfigError(f"{lora_model}: the adapter does not fit {base}, it was trained on a model of another "
                          f"size ({mismatch.rstrip('.')})") from None
    except ValueError as exc:  # e.g. "Target modules {...} not found in the base model"
        raise ConfigError(f"{lora_model}: the adapter does not fit {base} ({str(exc).splitlines()[0]})") from None
    # save_embedding_layers=True lists full embedding weights too (an adapter may carry resized ones) and stops
    # peft from asking the hub whether the vocabulary changed.
    unplaced = sorted(stored - set(get_peft_model_state_dict(model, save_embedding_layers=True)))
    if unplaced:
        raise ConfigError(f"{lora_model}: {len(unplaced)} of {len(stored)} adapter weights found no module in {base} "
                          f"(e.g. {unplaced[0]}): the adapter was trained on another model; pass the --base_model "
                          "it was trained on")
    model.eval()
    return model, len(stored)


# -- dtype, stop tokens, probe ------------------------------------------------------------------------------------

def saved_dtype_name(torch_dtype: str, base_config: dict) -> str:
    """--torch_dtype when given, else the dtype the base is stored in (its config.json), else float32."""
    if torch_dtype != "auto":
        return torch_dtype
    stored = base_config.get("dtype") or base_config.get("torch_dtype")
    if stored in ("float32", "bfloat16", "float16"):
        return stored
    if stored not in (None, "auto"):
        logger.warning("base config.json says dtype %r; saving float32 (pass --torch_dtype to choose)", stored)
    return "float32"


def chat_template_or_none(tokenizer, name: str | None, known_stop_ids: list[int]):
    """The chat template the merged model will be used with; a pretraining base may have none (then the merged
    folder keeps the base's stop ids)."""
    from medtune.templates.chat import ChatTemplate, TemplateError

    try:
        return ChatTemplate.for_tokenizer(tokenizer, name, known_stop_ids)
    except TemplateError:
        if name:
            raise
        logger.info("no chat template: generation_config.json keeps the base's eos_token_id")
        return None


def probe_inputs(tokenizer, template):
    import torch

    text = template.render(PROBE_MESSAGES) if template else "\n".join(m["content"] for m in PROBE_MESSAGES)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


def _float32(value):
    return value.float() if hasattr(value, "is_floating_point") and value.is_floating_point() else value


@contextlib.contextmanager
def computed_in_float32(model):
    """Run forward passes in float32 while the weights stay stored in their own dtype: each module's parameters
    are upcast just before it runs and the stored tensors put back right after (untouched, so weights that are
    still memory-mapped from the checkpoint stay so), so memory stays at one copy plus one module in float32."""
    stored: dict[int, list] = {}

    def upcast(module, args, kwargs):
        parameters = list(module.parameters(recurse=False))
        stored[id(module)] = [p.data for p in parameters]
        for parameter in parameters:
            parameter.data = parameter.data.float()
        return tuple(map(_float32, args)), {key: _float32(value) for key, value in kwargs.items()}

    def restore(module, args, output):
        for parameter, data in zip(module.parameters(recurse=False), stored.pop(id(module))):
            parameter.data = data

    handles = []
    for module in model.modules():
        if next(module.parameters(recurse=False), None) is not None:
            handles.append(module.register_forward_pre_hook(upcast, with_kwargs=True))
            handles.append(module.register_forward_hook(restore))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def float32_logits(model, probe):
    import torch

    with torch.no_grad(), computed_in_float32(model):
        return model(input_ids=probe).logits.float()


def logit_tolerance(check_tolerance: float, dtype, reference) -> float:
    """`check_tolerance`, plus what rounding each merged weight once into `dtype` may move the logits by.

    A bf16 weight keeps 8 significant bits, so round(W + BA) is within 2**-9 (relative) of the exact sum: the same
    rounding the base's own weights carry. On the tiny models the resulting max |logit difference| is about
    1 x eps(bf16) x max|logit| (measured: 0.0054 at max |logit| 1.43); ROUNDING_STEPS = 4 leaves room for deeper
    models. A wrong merge (a dropped layer, a wrong scale, another model's adapter) moves logits by the size of the
    adapter's effect, reported beside it in merge_check.json. For float32 the second term is negligible."""
    import torch

    return check_tolerance + ROUNDING_STEPS * torch.finfo(dtype).eps * reference.abs().max().item()


# -- output folder ------------------------------------------------------------------------------------------------

def _same_folder(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def check_output_dir(output_dir: Path, inputs: dict[str, Path]) -> None:
    for what, folder in inputs.items():
        if _same_folder(output_dir, folder):
            raise ConfigError(f"--output_dir {output_dir} is the {what}'s folder; merge never overwrites its inputs")
    existing = next((p for p in (output_dir, *output_dir.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"--output_dir {output_dir}: {existing} is a file, not a folder; choose a new folder")
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise ConfigError(f"--output_dir {output_dir} is not empty; choose a new folder")


def staging_dir(output_dir: Path) -> Path:
    """The hidden sibling the merge is written to; a fixed name, so a run killed midway is found and removed."""
    return output_dir.with_name(f".{output_dir.name}.merging")


def fresh_staging_dir(output_dir: Path) -> Path:
    staging = staging_dir(output_dir)
    if staging.exists():
        logger.warning("removing %s, the unfinished output of an interrupted merge", staging)
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish(staging: Path, output_dir: Path) -> None:
    """Rename the complete merge into place: --output_dir is either absent/empty or complete, never half written."""
    if output_dir.is_dir():
        output_dir.rmdir()  # checked empty before the merge started
    os.rename(staging, output_dir)


def _newest_file(folder: Path) -> Path | None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else None


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise MedtuneError(f"{folder}: not enough disk space for the merged model (needs about {byte_size(needed)}, "
                           f"{byte_size(free)} free); nothing was written")


def explain_failed_write(staging: Path, needed: int):
    """A failed save (disk full above all) becomes one line naming the file being written and the space needed."""
    def describe(exc: BaseException) -> str:
        target = file_named_by(exc, _newest_file(staging) or staging)
        reason = "no space left on device" if is_disk_full(exc) else (getattr(exc, "strerror", None) or str(exc))
        return (f"{target}: {reason} while saving the merged model (it needs about {byte_size(needed)}; "
                f"{byte_size(free_space(staging.parent))} free now); the partial output was removed")

    return failed_write_reported(describe, any_os_error=True)


# -- the stage ----------------------------------------------------------------------------------------------------

def run_merge(model_args: ModelArguments, args: MergeArguments) -> Path:
    import torch

    from medtune.models.loader import (
        add_stop_ids,
        generation_stop_ids,
        load_model,
        load_tokenizer,
        read_model_config,
    )

    lora_dir, output_dir = Path(args.lora_model), Path(args.output_dir)
    adapter_config = read_adapter_config(lora_dir)
    base = model_args.model_name_or_path or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ConfigError(f"{lora_dir}: the adapter does not record its base model; pass --base_model")
    check_output_dir(output_dir, {"base model": Path(base), "adapter": lora_dir})
    base_config = read_model_config(base, required=True)
    check_adapter_base(lora_dir, adapter_config, base, base_config)

    tokenizer_source = model_args.tokenizer_name_or_path or (
        str(lora_dir) if (lora_dir / "tokenizer_config.json").is_file() else base)
    tokenizer = load_tokenizer(tokenizer_source, model_args.trust_remote_code)
    check_tokenizer_belongs_to_base(tokenizer, tokenizer_source, base, model_args.trust_remote_code)
    # Stop ids the training run recorded beside the adapter count too (training writes them there).
    template = chat_template_or_none(tokenizer, model_args.template,
                                     generation_stop_ids(base) + generation_stop_ids(str(lora_dir)))
    if template is not None and model_args.template:
        tokenizer.chat_template = template.jinja  # the merged folder renders with the template it was asked for

    dtype_name = saved_dtype_name(model_args.torch_dtype, base_config)
    load = {"torch_dtype": dtype_name, "trust_remote_code": model_args.trust_remote_code,
            "attn_implementation": model_args.attn_implementation}
    model = load_model(base, **load)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model, lora_weights = attach_adapter(model, lora_dir, base)
    probe = probe_inputs(tokenizer, template)
    expected = float32_logits(model, probe)
    with model.disable_adapter():
        adapter_effect = (float32_logits(model, probe) - expected).abs().max().item()
    with torch.no_grad():
        # In place, one layer at a time: `weight += delta` with a float32 delta rounds once into bf16/fp16. (peft's
        # safe_merge would round the delta to bf16 first, a second rounding; a NaN fails the logit check anyway.)
        merged = model.merge_and_unload()
    del model
    stop_ids = add_stop_ids(merged.generation_config, template.stop_token_ids if template else [])
    needed = sum(t.numel() * t.element_size() for t in {p.data_ptr(): p for p in merged.state_dict().values()}
                 .values())
    check_free_space(next(p for p in output_dir.absolute().parents if p.exists()), needed)

    staging = fresh_staging_dir(output_dir)
    try:
        with explain_failed_write(staging, needed):
            merged.save_pretrained(str(staging), safe_serialization=True)
            tokenizer.save_pretrained(str(staging))
        del merged
        gc.collect()  # the reloaded copy below replaces the merged one: never two copies in memory
        reloaded = load_model(str(staging), **load)
        difference = (float32_logits(reloaded, probe) - expected).abs().max().item()
        dtype = reloaded.dtype
        del reloaded
        tolerance = logit_tolerance(args.check_tolerance, dtype, expected)
        if not difference <= tolerance:
            raise MedtuneError(f"{output_dir}: the merged model's logits differ from base+adapter by "
                               f"{difference:.3g} (> {tolerance:.3g}); nothing was written")
        report = {"base_model": base, "lora_model": str(lora_dir), "max_abs_logit_difference": difference,
                  "tolerance": tolerance, "adapter_effect": adapter_effect, "probe_tokens": int(probe.shape[1]),
                  "saved_dtype": dtype_name, "lora_weights_merged": lora_weights, "eos_token_id": stop_ids}
        with explain_failed_write(staging, needed):
            (staging / "merge_check.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
        publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if adapter_effect <= tolerance:
        logger.warning("the adapter moves the probe's logits by only %.3g (tolerance %.3g): the check cannot tell "
                       "this merge from the base", adapter_effect, tolerance)
    logger.info("merged %s into %s -> %s (%s, max |logit difference| %.2e, adapter effect %.2e)", lora_dir, base,
                output_dir, dtype_name, difference, adapter_effect)
    return output_dir

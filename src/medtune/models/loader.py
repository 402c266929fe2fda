"""Load tokenizers and models from local folders (or hub ids), attach LoRA, and decide dtype and remote code.

Every stage, evaluation and serving path loads through here, so a policy (dtype, `trust_remote_code`, padding
side) is decided once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medtune.errors import ConfigError, MedtuneError

logger = logging.getLogger(__name__)

# Families whose fp16 training is known to give NaN / zero loss (LLaMA-Factory #4116, #4202).
_FP16_UNSAFE = ("glm", "glm4", "chatglm")


def resolve_model_path(model_name_or_path: str | None) -> str:
    """The model to load: the given path, or the embedded tiny GLM-4 model when none is given."""
    if model_name_or_path:
        return model_name_or_path
    from medtune.models.tiny import default_model_dir

    path = default_model_dir("glm4")
    logger.info("no --model_name_or_path given: using the embedded tiny GLM-4 model at %s", path)
    return str(path)


def read_model_config(path: str, *, required: bool = False) -> dict:
    """The folder's config.json ({} for a tokenizer-only folder or a hub id, unless `required`)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        if required and Path(path).exists():
            raise MedtuneError(f"{path}: not a model folder (no config.json)")
        return {}  # a hub id: transformers will fetch it (needs network) and report its own errors
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedtuneError(f"{config_file}:{exc.lineno}: invalid JSON ({exc.msg})") from None


def check_exists(path: str) -> None:
    """A path that looks local but is not there gets a plain answer, not the hub's repo-id error."""
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1  # a hub id is "owner/name"
    if looks_local and not Path(path).expanduser().exists():
        raise MedtuneError(f"{path}: no such model folder (medtune loads local folders; hub ids need a network)")


def refuse_output_in_model_folder(output_dir: str, *model_paths: str | None) -> None:
    """Writing results into (or under) the folder a model is read from would overwrite or mix with its files."""
    out = Path(output_dir).expanduser().resolve()
    for source in model_paths:
        if not source or not Path(source).expanduser().is_dir():
            continue  # a hub id has no folder to protect
        folder = Path(source).expanduser().resolve()
        if out == folder or folder in out.parents:
            where = "is" if out == folder else "is inside"
            raise ConfigError(f"{output_dir}: output_dir {where} the model folder {source}; writing there would "
                              "overwrite or mix with the model's files: choose another --output_dir")


def check_remote_code(path: str, trust_remote_code: bool) -> None:
    """Refuse, with the fix, a model that transformers can only load by running code from the model folder."""
    from transformers import CONFIG_MAPPING

    check_exists(path)
    config = read_model_config(path)
    model_type = config.get("model_type")
    if config.get("auto_map") and model_type not in CONFIG_MAPPING and not trust_remote_code:
        raise ConfigError(
            f"{path}: model_type {model_type!r} needs the Python code shipped in the model folder; pass "
            "--trust_remote_code true if you trust it (or use the '-hf' checkpoint that transformers loads natively)"
        )


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_remote_code(path, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MedtuneError(f"{path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token is None:
        # Padding never contributes to the loss (labels are -100 there), so reusing EOS is safe.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_dtype(torch_dtype: str, bf16: bool = False, fp16: bool = False):
    import torch

    if torch_dtype == "auto":
        if bf16:
            return torch.bfloat16
        if fp16:
            return torch.float16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[torch_dtype]


def usable_attention(attn_implementation: str | None) -> str | None:
    """flash_attention_2 when flash-attn and a CUDA GPU are there, else sdpa (same results, no varlen kernel):
    a shipped GPU config then still runs instead of ending in an ImportError."""
    from transformers.utils import is_flash_attn_2_available

    if attn_implementation == "flash_attention_2" and not is_flash_attn_2_available():
        from medtune.optional import install_hint

        logger.warning("attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package (%s); "
                       "using sdpa instead", install_hint("flash_attn"))
        return "sdpa"
    return attn_implementation


def weights_format(path: str) -> dict:
    """Prefer safetensors when a folder has both formats; say so when there is only a pickled pytorch_model.bin
    (transformers loads it with torch's weights_only loader, which refuses arbitrary code but is slower)."""
    folder = Path(path)
    if not folder.is_dir():
        return {}
    if any(folder.glob("model*.safetensors")):
        return {"use_safetensors": True}
    if any(folder.glob("pytorch_model*.bin")):
        logger.warning("%s has only pytorch_model.bin (no safetensors): loading it with torch.load(weights_only="
                       "True); saving the model again (e.g. `medtune merge`) writes safetensors", path)
    return {}


def quantization_config(lora_args, compute_dtype):
    """bitsandbytes settings for QLoRA (None without --load_in_4bit/--load_in_8bit): NF4 with double quantisation
    by default, matmuls in the training dtype. The checks (CUDA, bitsandbytes) ran when the options were parsed."""
    from transformers import BitsAndBytesConfig

    if lora_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if not lora_args.load_in_4bit:
        return None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=lora_args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=lora_args.bnb_4bit_use_double_quant,
                              bnb_4bit_compute_dtype=compute_dtype)


def load_model(path: str, *, torch_dtype: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = None, bf16: bool = False, fp16: bool = False,
               quantization=None):
    """A causal LM on the CPU (the Trainer or accelerate moves it), in the requested dtype; a quantised one
    (`quantization`, a BitsAndBytesConfig) is loaded straight onto this process's GPU, where bitsandbytes packs it."""
    from transformers import AutoModelForCausalLM

    hide_library_deprecations()
    check_remote_code(path, trust_remote_code)
    model_type = read_model_config(path, required=True).get("model_type", "")
    if fp16 and model_type in _FP16_UNSAFE:
        logger.warning("fp16 training of %s models is known to give NaN or zero loss; prefer --bf16 true", model_type)
    dtype = resolve_dtype(torch_dtype, bf16, fp16)
    kwargs = {"dtype": dtype, "trust_remote_code": trust_remote_code, **weights_format(path)}
    attn_implementation = usable_attention(attn_implementation)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        import os

        kwargs.update(quantization_config=quantization, device_map={"": int(os.environ.get("LOCAL_RANK", 0))})
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise MedtuneError(f"{path}: cannot load the model ({str(exc).splitlines()[0]})") from None


def hide_library_deprecations() -> None:
    """Silence deprecation warnings that medtune's own calls do not cause and users cannot act on: peft 0.21
    (wrapping a model in LoRA, loading an adapter) and trl 1.16 read PreTrainedModel.is_gradient_checkpointing, which
    transformers 5 deprecates. Installed by `load_model`, which every stage, evaluation, merge, chat, serve and the
    pipeline load their models through."""
    import warnings

    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


def lora_config(lora_args):
    """The peft LoraConfig for these arguments; default targets are all linear layers except the output head."""
    from peft import LoraConfig, TaskType

    targets = lora_args.target_modules
    if not targets or targets == ["all"]:
        targets = "all-linear"
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_args.lora_rank,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=targets,
        modules_to_save=lora_args.modules_to_save,
    )


def attach_lora(model, lora_args):
    """Wrap `model` with a fresh LoRA adapter (see `lora_config`)."""
    from peft import get_peft_model

    from medtune.models.fast_lora import use_fast_lora

    config = lora_config(lora_args)
    targets = config.target_modules
    try:
        model = get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"LoRA: {str(exc).splitlines()[0]}") from None
    use_fast_lora(model)
    trainable, total = model.get_nb_trainable_parameters()
    logger.info("LoRA r=%d alpha=%g on %s: %d of %d parameters trainable (%.2f%%)", lora_args.lora_rank,
                lora_args.lora_alpha, targets, trainable, total, 100 * trainable / total)
    return model


def generation_stop_ids(path: str) -> list[int]:
    """The ids that end generation for this model (generation_config.json's eos_token_id, one or a list)."""
    config_file = Path(path) / "generation_config.json"
    if not config_file.is_file():
        return []
    eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token_id")
    return [eos] if isinstance(eos, int) else list(eos or [])


def load_chat_template(model_path: str, tokenizer, name: str | None = None, system_prompt: str | None = None):
    """The ChatTemplate every stage and inference path uses for this model (see medtune.templates.chat), giving
    `system_prompt` to conversations that have no system message."""
    from medtune.templates.chat import ChatTemplate

    return ChatTemplate.for_tokenizer(tokenizer, name, generation_stop_ids(model_path), system_prompt)


def optional_chat_template(model_path: str, tokenizer, name: str | None = None):
    """The chat template when the model has one (or one is named), else None: pretraining needs none, but a
    template it has decides the stop ids its output folder records."""
    from medtune.templates.chat import TemplateError

    try:
        return load_chat_template(model_path, tokenizer, name)
    except TemplateError:
        if name:
            raise
        return None


def add_stop_ids(generation_config, stop_ids: list[int]) -> list[int]:
    """eos_token_id becomes the base's eos ids plus the template's stop ids, so vLLM and plain `generate()` stop at
    the end of an assistant turn (`<|im_end|>`, GLM-4's `<|user|>`, `<|eot_id|>`)."""
    eos = generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    generation_config.eos_token_id = list(dict.fromkeys(eos + stop_ids))
    return generation_config.eos_token_id

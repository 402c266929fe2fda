"""Configuration dataclasses shared by every stage.

Names follow MedicalGPT and the book where they exist, so existing YAML and shell scripts keep working.
Each option is declared once here; a stage combines the dataclasses it needs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from transformers import TrainingArguments

from medtune.errors import ConfigError

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
# The book passes --model_type chatglm/glm4/qwen/llama. The model's own config.json says what it is, so the name is
# used as a check: a model of another family (a wrong path in a script) is refused before anything is loaded.
MODEL_FAMILIES = {
    "chatglm": ("chatglm", "glm", "glm4"), "glm": ("chatglm", "glm", "glm4"), "glm4": ("chatglm", "glm", "glm4"),
    "qwen": ("qwen", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"), "qwen2": ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"),
    "llama": ("llama",), "llama3": ("llama",),
}
MODEL_TYPES = ("auto", *MODEL_FAMILIES)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelArguments:
    """Which model and tokenizer to load, and how."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local model directory (or hub id with network). Default: the embedded tiny GLM-4 model, "
                          "built on first use (merge: the base recorded in the adapter).",
                  "aliases": ["--model", "--base_model"]},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory if it differs from the model's.",
                                "aliases": ["--tokenizer_path"]},
    )
    model_type: str = field(
        default="auto",
        metadata={"help": f"The model family the book's scripts name ({', '.join(MODEL_TYPES)}): checked against the "
                          "model folder's config.json, and a model of another family is refused. auto: no check."},
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (bf16/fp16 when that flag is set, else float32; merge: the base's "
                          "dtype from its config.json), float32, bfloat16, float16."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run Python code shipped inside the model folder. Off by default: opt in only for "
                          "models you trust that transformers cannot load natively."},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "eager, sdpa or flash_attention_2 (default: transformers' choice)."}
    )
    template: str | None = field(
        default=None,
        metadata={"help": "Chat template name (glm4, chatglm3, qwen, llama3, vicuna, alpaca). Default: the "
                          "tokenizer's own chat_template. Training, evaluation and inference all render with it.",
                  "aliases": ["--template_name"]},
    )

    def __post_init__(self):
        _check_choice("torch_dtype", self.torch_dtype, TORCH_DTYPES)
        _check_choice("model_type", self.model_type, MODEL_TYPES)
        check_model_family(self.model_name_or_path, self.model_type)


def check_model_family(model_path: str | None, model_type: str) -> None:
    """Refuse a local model whose config.json names another family than `--model_type` (hub ids and the default
    tiny model are not checked here: there is no folder to read yet)."""
    if model_type == "auto" or not model_path:
        return
    config_file = Path(model_path).expanduser() / "config.json"
    try:
        found = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return  # no readable config here: the loader reports a missing or broken model folder itself
    if found and found not in MODEL_FAMILIES[model_type]:
        raise ConfigError(f"model_type={model_type!r}, but {config_file} says model_type {found!r}; pass the "
                          "right --model_type (or auto) or the right model folder")


QUANT_TYPES = ("nf4", "fp4")


@dataclass
class LoraArguments:
    """LoRA through peft (the default), QLoRA (LoRA on a base quantised to 4 or 8 bits by bitsandbytes, on a CUDA
    GPU), or full fine-tuning (`--use_peft false`)."""

    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter; false trains every weight."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt, e.g. q_proj v_proj. Default (or 'all'): every linear layer "
                          "except the output head."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (effective scale alpha/r)."})
    lora_dropout: float = field(
        default=0.05, metadata={"help": "Dropout on the LoRA input. On CPU its mask takes 16 random bits an element "
                                        "(the rate rounded to a multiple of 1/65536), several times cheaper than "
                                        "torch's; elsewhere it is torch's dropout."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. embed_tokens lm_head."}
    )

    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "QLoRA: load the base's linear layers in 4 bits (bitsandbytes, CUDA only; pip install "
                          "'medtune[gpu]'), prepare it for k-bit training and train LoRA on top."},
    )
    load_in_8bit: bool = field(
        default=False, metadata={"help": "Like load_in_4bit with 8-bit weights (LLM.int8)."}
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "4-bit data type: nf4 (NormalFloat, the QLoRA paper's) or fp4."}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=True, metadata={"help": "Quantise the 4-bit block scales too (about 0.4 bits per weight saved)."}
    )

    def __post_init__(self):
        if self.lora_rank <= 0:
            raise ConfigError(f"lora_rank must be positive, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check_choice("bnb_4bit_quant_type", self.bnb_4bit_quant_type, QUANT_TYPES)
        if self.quantization_bits:
            self._check_quantization()

    @property
    def quantization_bits(self) -> int | None:
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    def _check_quantization(self) -> None:
        option = f"--load_in_{self.quantization_bits}bit"
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit: choose one")
        if not self.use_peft:
            raise ConfigError(f"{option} needs use_peft true: quantised weights cannot be trained in full (QLoRA "
                              "trains a LoRA adapter on top of them)")
        import torch

        from medtune.optional import install_hint, is_installed

        missing = [] if torch.cuda.is_available() else ["a CUDA GPU (none was found)"]
        if not is_installed("bitsandbytes"):
            missing.append(f"the bitsandbytes package ({install_hint('bitsandbytes')})")
        if missing:
            raise ConfigError(f"{option} (QLoRA) needs {' and '.join(missing)}; without them train LoRA on the "
                              "unquantised model (drop the option)")


REMAINDER_MODES = ("pad", "drop")


@dataclass
class DataArguments:
    """Where a stage's data is and how much of it to use; every stage's data arguments extend this."""

    train_file_dir: str | None = field(
        default=None, metadata={"help": "Training data: a folder (searched recursively) or one file. Default: the "
                                        "stage's bundled sample under data/."},
    )
    validation_file_dir: str | None = field(
        default=None, metadata={"help": "Held-out data in the same formats; otherwise a split of the training data."}
    )
    validation_split_percentage: float = field(
        default=5.0, metadata={"help": "Percent of training records held out for evaluation when no "
                                       "validation_file_dir is given (0 disables evaluation)."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep at most this many training samples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep at most this many evaluation samples."})
    data_cache_dir: str | None = field(
        default=None, metadata={"help": "Where tokenized data is cached (default ~/.cache/medtune/tokenized)."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenize even if a cache entry exists."})

    def __post_init__(self):
        if not 0.0 <= self.validation_split_percentage < 100.0:
            raise ConfigError("validation_split_percentage must be in [0, 100)")


@dataclass
class PretrainDataArguments(DataArguments):
    """Continued-pretraining text (.txt: one document per non-empty line; .jsonl/.json: a 'text' field) and how it
    becomes fixed-length blocks."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` name or local dataset folder with a 'text' column (needs "
                                        "network for hub names); used instead of train_file_dir."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset's configuration name."})
    block_size: int = field(default=1024, metadata={"help": "Tokens per training block."})
    remainder: str = field(
        default="pad",
        metadata={"help": "The last partial block: 'pad' keeps it (padding is masked from the loss), 'drop' "
                          "discards it. Either way the count is logged."},
    )
    streaming: bool = field(
        default=False,
        metadata={"help": "Read, tokenize and group the corpus on the fly (for corpora larger than memory); needs "
                          "max_steps. Evaluation then uses validation_file_dir only."},
    )

    def __post_init__(self):
        super().__post_init__()
        _check_choice("remainder", self.remainder, REMAINDER_MODES)
        if self.block_size <= 1:
            raise ConfigError(f"block_size must be at least 2, got {self.block_size}")


@dataclass
class SystemPromptArguments:
    """The system prompt of conversations that bring none (sft, dpo, eval, chat, serve, predict)."""

    system_prompt: str | None = field(
        default=None,
        metadata={"help": "A system message put first in every conversation that has none when it is rendered "
                          "through the chat template: training records, evaluation prompts, chat, serve requests and "
                          "predict records (one with its own system message keeps it). Default: none added, so the "
                          "template's own default applies (what the model family uses, e.g. Qwen2.5's 'You are "
                          "Qwen...'; GLM-4 and Llama-3: none); '' adds none either. chat's default is a "
                          "medical-information assistant that says it is not a doctor (Chinese and English), and "
                          "/system TEXT changes it during the chat."},
    )


@dataclass
class SourceTargetLengthArguments:
    """MedicalGPT's split of the length limit into a prompt (source) part and a reply (target) part."""

    max_source_length: int | None = field(
        default=None,
        metadata={"help": "MedicalGPT's name: most prompt tokens. dpo: the prompt keeps at most this many (cut as "
                          "truncation_mode says). sft: per turn, the tokens before each reply (the user turn with "
                          "the template's tags; the system prompt too for the first turn) keep at most this many: "
                          "their end, i.e. the question and the assistant tag, plus the template's leading tokens "
                          "such as [gMASK]<sop> and the user turn's role header. Applied before the overall length "
                          "limit."},
    )
    max_target_length: int | None = field(
        default=None,
        metadata={"help": "MedicalGPT's name: most reply tokens. dpo: each answer; sft: each assistant reply (with "
                          "its stop token); cut at the end, an sft reply keeping its stop token. Applied before the "
                          "overall length limit."},
    )

    def length_limit(self, given: int | None, default: int) -> int:
        """The overall limit: `given`, else max_source_length + max_target_length when both are set, else
        `default`."""
        for name in ("max_source_length", "max_target_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if given is not None:
            return given
        split = (self.max_source_length, self.max_target_length)
        return sum(split) if None not in split else default


SFT_FORMATS = ("auto", "sharegpt", "openai", "alpaca")


@dataclass
class SFTDataArguments(DataArguments, SourceTargetLengthArguments, SystemPromptArguments):
    """Conversations for supervised fine-tuning, and how they become token ids and labels."""

    data_format: str = field(
        default="auto", metadata={"help": f"Record format: {', '.join(SFT_FORMATS)} (auto detects it per file)."}
    )
    model_max_length: int | None = field(
        default=None, metadata={"help": "Longest tokenized conversation (default 2048, or max_source_length + "
                                        "max_target_length when both are given); longer ones are cut at the end "
                                        "(samples left with no supervised token are dropped and counted)."},
    )
    train_on_prompt: bool = field(
        default=False, metadata={"help": "Also compute the loss on system/user turns and template scaffolding."}
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Pack several conversations into each sequence (position ids restart per conversation and "
                          "attention never crosses conversations). Off: length-grouped, padded batches."},
    )
    varlen_attention: bool = field(
        default=True,
        metadata={"help": "With packing under sdpa or eager attention (CPU; GPUs without flash-attn): attend within "
                          "each conversation separately, so a row costs the sum of its conversations' squared "
                          "lengths instead of its own squared length; the same loss. Models it cannot serve exactly "
                          "(sliding window, attention sinks, logit softcapping, multimodal) keep transformers' "
                          "block-diagonal mask, and the log says why. flash-attention uses its own varlen kernels."},
    )

    def __post_init__(self):
        super().__post_init__()
        _check_choice("data_format", self.data_format, SFT_FORMATS)
        self.model_max_length = self.length_limit(self.model_max_length, 2048)
        if self.model_max_length < 8:
            raise ConfigError(f"model_max_length must be at least 8, got {self.model_max_length}")


PREFERENCE_FORMATS = ("auto", "preference", "preference_conversations", "preference_hf")


@dataclass
class PreferenceDataArguments(DataArguments, SourceTargetLengthArguments, SystemPromptArguments):
    """Preference pairs: the book's system/history/question/response_chosen/response_rejected records,
    conversations + chosen/rejected, or Hugging Face prompt/chosen/rejected."""

    data_format: str = field(
        default="auto", metadata={"help": f"Record format: {', '.join(PREFERENCE_FORMATS)} (auto detects it per file)."}
    )
    max_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt+answer in tokens (default 1024, or max_source_length + max_target_length "
                          "when both are given). Longer pairs are truncated, never dropped: the prompt keeps its end "
                          "(at least half the budget if the answers need it) and both answers are cut at the end to "
                          "the rest. Truncated pairs are counted."},
    )

    def __post_init__(self):
        super().__post_init__()
        _check_choice("data_format", self.data_format, PREFERENCE_FORMATS)
        self.max_length = self.length_limit(self.max_length, 1024)
        if self.max_length < 16:
            raise ConfigError(f"max_length must be at least 16, got {self.max_length}")


@dataclass
class StageTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments (every Trainer option) with medtune's defaults and additions, shared by
    every training stage."""

    output_dir: str = field(default="outputs/run", metadata={"help": "Where checkpoints and results go."})
    report_to: None | str | list[str] = field(
        default="tensorboard", metadata={"help": "Loggers; TensorBoard event files go to output_dir/runs."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log loss, grad_norm and learning rate every N steps."})
    eval_strategy: str = field(
        default="steps", metadata={"help": "When to evaluate: steps, epoch or no (off when there is no eval set)."}
    )
    eval_on_start: bool = field(
        default=True, metadata={"help": "Evaluate once before training, so the improvement is on record."}
    )
    save_total_limit: int | None = field(default=3, metadata={"help": "Keep at most this many checkpoints."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "A checkpoint folder, or 'true' for the latest checkpoint in output_dir (starts fresh "
                          "when output_dir is new or empty; a folder holding a finished run but no checkpoint is "
                          "refused)."},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without a lower eval loss (needs an eval set); the "
                          "best checkpoint is loaded at the end."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP: search the graph for parameters that got no gradient on every step. Off: every "
                          "LoRA and full-fine-tuning parameter is used, and the search costs a graph traversal per "
                          "step; turn on only for a model with conditional branches (e.g. mixture-of-experts)."},
    )
    loss_only_labels: bool = field(
        default=True,
        metadata={"help": "Run the LM head only where the loss reads it (labelled tokens for pt/sft, reply tokens "
                          "for DPO), with chunked log-probs instead of full logits; DPO also computes each pair's "
                          "prompt once, in one row [prompt|chosen|rejected] (sdpa/eager attention). Same loss as "
                          "the standard path; false: transformers' and TRL's own forward."},
    )

    def __post_init__(self):
        if self.early_stopping_patience is not None:
            if self.early_stopping_patience < 1:
                raise ConfigError("early_stopping_patience must be at least 1")
            # The Trainer needs the best checkpoint tracked by eval loss for early stopping to mean anything.
            self.load_best_model_at_end = True
            self.metric_for_best_model = self.metric_for_best_model or "eval_loss"
        import torch

        if not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; on CPU it only warns
        # The book's --gradient_checkpointing is transformers 5's deprecated alias of activation_checkpointing: pass
        # it on under the new name, so that neither `true` nor `false` prints a deprecation warning.
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if getattr(self, old) is not None and getattr(self, new) is None:
                setattr(self, new, getattr(self, old))
                setattr(self, old, None)
        if self.bf16 and not self.use_cpu and not _bf16_accelerator():
            # the shipped GPU configs set bf16; transformers' own error does not say what to change
            raise ConfigError("bf16: true needs a GPU with bfloat16 support and none was found; on this machine "
                              "pass --bf16 false (and --torch_dtype float32) to train in float32")
        self._require_optional_packages()
        join_cpu_processes_into_one_run()
        super().__post_init__()

    def _require_optional_packages(self) -> None:
        from medtune.optional import require_package

        if self.deepspeed:
            require_package("deepspeed", "--deepspeed")
            if isinstance(self.deepspeed, str) and not Path(self.deepspeed).is_file():
                raise ConfigError(f"{self.deepspeed}: no such DeepSpeed config file (ready ones: configs/deepspeed/)")
        if self.use_liger_kernel:
            require_package("liger_kernel", "--use_liger_kernel")


def launched_processes() -> int:
    """How many processes torchrun / accelerate launch / mpirun started for this run (1 when run directly)."""
    import os

    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1


def join_cpu_processes_into_one_run() -> None:
    """Several launched processes on a machine without a GPU form one data-parallel run (gloo), not N copies.

    accelerate (which the Trainer uses to set up devices) treats launched processes as distributed only when it
    finds an accelerator or is told to use the CPU; otherwise it opens a process group but reports
    DistributedType.NO, so every process trained alone on the full data and saved over the others' files.
    ACCELERATE_USE_CPU is what `accelerate launch --cpu` sets; an environment variable rather than
    `use_cpu=True` keeps the saved config free of a machine-specific option.
    """
    import os

    import torch

    accelerator = torch.accelerator.current_accelerator()
    if launched_processes() > 1 and (accelerator is None or accelerator.type == "mps"):
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def _bf16_accelerator() -> bool:
    from transformers.utils import is_torch_bf16_gpu_available, is_torch_xla_available

    return is_torch_bf16_gpu_available() or is_torch_xla_available()


@dataclass
class PretrainTrainingArguments(StageTrainingArguments):
    output_dir: str = field(default="outputs/pt", metadata={"help": "Where checkpoints and results go."})


@dataclass
class SFTTrainingArguments(StageTrainingArguments):
    output_dir: str = field(default="outputs/sft", metadata={"help": "Where checkpoints and results go."})


DPO_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
              "exo_pair", "discopop", "sigmoid_norm")
PREFERENCE_METHODS = DPO_LOSSES + ("orpo", "simpo", "kto")
TRUNCATION_MODES = ("keep_end", "keep_start")
# The methods each method-specific option acts on; any other method would ignore it, so setting it there is an error.
OPTION_METHODS = {
    "precompute_ref_log_probs": DPO_LOSSES + ("kto",),  # ORPO and SimPO have no reference model
    "label_smoothing": ("robust", "exo_pair", "simpo"),
    "rpo_alpha": DPO_LOSSES,
    "desirable_weight": ("kto",),
    "undesirable_weight": ("kto",),
    "simpo_gamma": ("simpo",),
    "cpo_alpha": ("simpo",),
}
# Defaults that depend on the method: the SimPO paper's beta is 2.0 (TRL's CPOConfig keeps DPO's 0.1, which makes
# SimPO's length-normalised margin tiny); EXO needs a label-smoothing epsilon above 0 (its paper's 1e-3).
METHOD_BETA = {"simpo": 2.0}
METHOD_LABEL_SMOOTHING = {"exo_pair": 1e-3}


@dataclass
class DPOTrainingArguments(StageTrainingArguments):
    """Preference optimisation: DPO and its loss variants (TRL's DPOTrainer), ORPO, SimPO (TRL's CPO family) and
    KTO, selected by `loss_type`."""

    output_dir: str = field(default="outputs/dpo", metadata={"help": "Where checkpoints and results go."})
    learning_rate: float = field(default=5e-6, metadata={"help": "Peak learning rate."})
    loss_type: str = field(
        default="sigmoid",
        metadata={"help": "sigmoid (DPO), ipo, hinge (and TRL's other DPO losses), or orpo, simpo, kto."},
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "Strength of the KL penalty / reward scale. Default: 0.1 (DPO losses, ORPO's lambda, KTO); "
                          "2.0 for SimPO (the SimPO paper's value)."},
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "DPO losses and KTO: compute reference log-probs once before training (cached on disk by "
                          "model and data, reused by re-runs and other loss types): no reference forward pass per "
                          "step."},
    )
    truncation_mode: str = field(
        default="keep_end",
        metadata={"help": "Pairs longer than max_length (every method): keep_end keeps the prompt's end (the "
                          "question being answered), keep_start keeps its beginning (e.g. a long system prompt); the "
                          "template's leading tokens always stay, the prompt keeps at least half the budget if the "
                          "answers need more, and the answers are cut at their end."},
    )
    label_smoothing: float | None = field(
        default=None,
        metadata={"help": "robust, exo_pair and simpo: the probability that a preference label is wrong. Default: 0, "
                          "and 1e-3 for exo_pair (its paper's value; it needs one above 0)."},
    )
    rpo_alpha: float | None = field(
        default=None,
        metadata={"help": "DPO losses: add the chosen answers' NLL weighted by this (RPO; TRL's 'sft' loss term). "
                          "Default: off."},
    )
    desirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of the losses on chosen answers."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "KTO: weight of the losses on rejected answers."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO: target reward margin gamma."})
    cpo_alpha: float = field(default=0.0, metadata={"help": "SimPO: weight of an NLL term on chosen answers "
                                                            "(CPO-SimPO); 0 is plain SimPO."})

    def __post_init__(self):
        if self.loss_type == "dpo":  # what most people call the sigmoid loss
            self.loss_type = "sigmoid"
        _check_choice("loss_type", self.loss_type, PREFERENCE_METHODS)
        _check_choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        self._refuse_options_the_method_ignores()
        self.beta = self.method_default("beta") if self.beta is None else self.beta
        if self.label_smoothing is None:
            self.label_smoothing = self.method_default("label_smoothing")
        super().__post_init__()

    def method_default(self, name: str):
        """An option's default for this loss_type (what None means)."""
        if name == "beta":
            return METHOD_BETA.get(self.loss_type, 0.1)
        if name == "label_smoothing":
            return METHOD_LABEL_SMOOTHING.get(self.loss_type, 0.0)
        return type(self).__dataclass_fields__[name].default

    def _refuse_options_the_method_ignores(self) -> None:
        for name, methods in OPTION_METHODS.items():
            value = getattr(self, name)
            if self.loss_type in methods or value is None or value == self.method_default(name):
                continue
            dpo = set(DPO_LOSSES) <= set(methods)
            allowed = ", ".join((["the DPO losses"] if dpo else []) + [m for m in methods if not (dpo and m in DPO_LOSSES)])
            raise ConfigError(f"{name} applies to --loss_type {allowed}, not {self.loss_type}; remove it")


EVAL_MODES = ("auto", "likelihood", "generate")


@dataclass
class AdapterArguments:
    """A LoRA adapter used on top of the model (evaluation, chat, predict)."""

    adapter_name_or_path: str | None = field(
        default=None, metadata={"help": "A LoRA adapter applied to the model without merging."}
    )


@dataclass
class EvalArguments(AdapterArguments, SystemPromptArguments):
    """What to evaluate, against what, and how (all `medtune eval` commands)."""

    endpoint: str | None = field(
        default=None, metadata={"help": "An OpenAI-compatible server (e.g. http://127.0.0.1:8000, or `medtune serve`) "
                                        "instead of a local model; generate mode only. Requests go through the "
                                        "official openai client, which retries 429 and 5xx replies with backoff."},
    )
    endpoint_model: str = field(default="default", metadata={"help": "The model name sent to the endpoint."})
    endpoint_api_key: str | None = field(
        default=None, metadata={"help": "API key of --endpoint (default: the OPENAI_API_KEY environment variable; "
                                        "none for a server that needs no key)."},
    )
    endpoint_max_retries: int = field(
        default=5, metadata={"help": "Retries of a request that fails with 429, 5xx, a timeout or a dropped "
                                     "connection (exponential backoff from 0.5 s, or the server's Retry-After)."},
    )
    data_dir: str | None = field(
        default=None, metadata={"help": "CMB folder with test.json, test_answers.json, val.json, clin.json (default: "
                                        "the bundled data/eval/cmb), or a file.", "aliases": ["--data"]},
    )
    split: str = field(default="test", metadata={"help": "cmb-exam: test or val."})
    answers_file: str | None = field(
        default=None, metadata={"help": "Answer key keyed by id (default: <data_dir>/test_answers.json for test)."}
    )
    output_dir: str = field(
        default="outputs/eval", metadata={"help": "Where answers and results are written. A re-run resumes its "
                                                  "answers if the options and weights are unchanged; otherwise the "
                                                  "old ones are moved aside (*.stale-*) and recomputed."},
    )
    mode: str = field(
        default="auto", metadata={"help": "likelihood (compare option scores; local models), generate (decode and "
                                          "extract), or auto (likelihood locally, generate for an endpoint)."},
    )
    cot: bool = field(default=False, metadata={"help": "Chain-of-thought prompt (official CoT wording)."})
    shots: int = field(default=0, metadata={"help": "Few-shot examples from the val split (with explanations)."})
    official: bool = field(
        default=False, metadata={"help": "Reproduce the official CMB scripts exactly: options in file order with "
                                         "one-character ones dropped, random same-class few-shot examples, the "
                                         "official answer extraction, exact-string scoring (cmb-score too)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass / generate call."})
    max_new_tokens: int = field(default=512, metadata={"help": "Generation length (official CMB setting: 512)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N items / cases."})
    predictions: str | None = field(default=None, metadata={"help": "cmb-score: an answer file [{id, model_answer}]."})
    truth: str | None = field(default=None, metadata={"help": "cmb-score: answer key [{id, exam_type, exam_class, "
                                                              "answer}]."})
    judge_endpoint: str | None = field(
        default=None, metadata={"help": "cmb-clin: an OpenAI-compatible endpoint that scores answers with the "
                                        "official four-criterion rubric."},
    )
    judge_model: str = field(default="default", metadata={"help": "cmb-clin: the judge's model name."})
    judge_api_key: str | None = field(
        default=None, metadata={"help": "cmb-clin: API key of --judge_endpoint (default: OPENAI_API_KEY)."}
    )
    block_size: int = field(default=512, metadata={"help": "ppl: tokens per evaluation block."})
    num_samples: int = field(
        default=1, metadata={"help": "generate: sample N replies per item and keep the majority answer (the most "
                                     "frequent non-empty extraction, first seen wins a tie; the official "
                                     "self-consistency setting). 1 = one greedy reply."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature when --num_samples > 1."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold when --num_samples > 1."})
    seed: int = field(
        default=42, metadata={"help": "Seed of the --official few-shot draw (per item) and of sampled replies, so a "
                                      "run is reproducible."},
    )

    def __post_init__(self):
        _check_choice("mode", self.mode, EVAL_MODES)
        _check_choice("split", self.split, ("test", "val"))
        if self.shots < 0 or self.batch_size < 1:
            raise ConfigError("shots must be >= 0 and batch_size >= 1")
        if self.num_samples < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("num_samples must be >= 1, temperature > 0 and top_p in (0, 1]")
        if self.endpoint_max_retries < 0:
            raise ConfigError("endpoint_max_retries must be >= 0")


@dataclass
class MergeArguments:
    """Fold a LoRA adapter into its base model and save a standalone model. Which base, tokenizer, dtype and chat
    template come from ModelArguments (`--base_model`, `--tokenizer_path`, `--torch_dtype`, `--template`)."""

    lora_model: str = field(default="", metadata={"help": "The LoRA adapter directory (e.g. a pt or sft output_dir)."})
    output_dir: str = field(default="", metadata={"help": "Where the merged model goes: a new or empty folder (never "
                                                         "the base's or the adapter's). Written to a temporary "
                                                         "sibling folder and renamed into place when complete."})
    check_tolerance: float = field(
        default=1e-4,
        metadata={"help": "Largest allowed |logit difference| between base+adapter and the reloaded merged model on "
                          "a probe input (computed in float32), plus 4 x the saved dtype's epsilon x the largest "
                          "|logit| (the rounding of bf16/fp16 weights)."},
    )

    def __post_init__(self):
        if not self.lora_model:
            raise ConfigError("merge needs --lora_model (the adapter folder)")
        if not self.output_dir:
            raise ConfigError("merge needs --output_dir (a new folder for the merged model)")


GENERATION_BACKENDS = ("hf", "vllm")


@dataclass
class GenerationArguments:
    """How replies are decoded (`medtune chat`, `medtune predict`)."""

    max_new_tokens: int = field(default=512, metadata={"help": "Longest reply, in tokens."})
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature; 0 decodes greedily (the same reply every time)."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold (with --temperature > 0)."})
    seed: int = field(
        default=42, metadata={"help": "Seed of sampled replies: the same seed, prompt and options give the same "
                                      "replies, whatever the batch or a resumed run's order."},
    )
    num_return_sequences: int = field(
        default=1, metadata={"help": "predict: replies per prompt (more than 1 needs --temperature > 0).",
                             "aliases": ["--n"]},
    )

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.num_return_sequences < 1:
            raise ConfigError("max_new_tokens and num_return_sequences (--n) must be >= 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ConfigError("temperature must be >= 0 and top_p in (0, 1]")
        if self.num_return_sequences > 1 and self.temperature == 0:
            raise ConfigError(f"--n {self.num_return_sequences} greedy replies would all be the same; pass "
                              "--temperature above 0 (e.g. 0.7) to sample them")


DEFAULT_SYSTEM_PROMPT = ("你是一个医学信息助手，提供医学知识与健康信息，但你不是医生，不能替代医生的诊断和治疗；"
                         "病情紧急或严重时请及时就医。 You are a medical information assistant: you give medical "
                         "information, but you are not a doctor and do not replace a doctor's diagnosis or "
                         "treatment; in an emergency, seek medical care.")


@dataclass
class ChatArguments(SystemPromptArguments):
    """`medtune chat`: a conversation in the terminal (its system prompt defaults to DEFAULT_SYSTEM_PROMPT)."""

    show_prompt_ids: bool = field(
        default=False, metadata={"help": "Print the token ids of every rendered prompt before the reply (to check "
                                         "what the model is given)."},
    )

    def __post_init__(self):
        if self.system_prompt is None:  # chat's own default, unlike the other commands' "the template's"
            self.system_prompt = DEFAULT_SYSTEM_PROMPT


@dataclass
class BackendArguments:
    """Which engine generates replies (`medtune serve`, `medtune predict`)."""

    backend: str = field(
        default="hf", metadata={"help": "hf: transformers on this machine (CPU or GPU); "
                                        "vllm: vLLM's engine (needs the vllm package and a CUDA GPU)."},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vllm: GPUs the model is split over."})

    def __post_init__(self):
        _check_choice("backend", self.backend, GENERATION_BACKENDS)
        if self.tensor_parallel_size < 1:
            raise ConfigError("tensor_parallel_size must be >= 1")


@dataclass
class ServeArguments(BackendArguments, SystemPromptArguments):
    """`medtune serve`: an OpenAI-compatible HTTP server with a chat page."""

    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on, IPv4 or IPv6; 127.0.0.1 (or "
                                                             "::1) keeps the server on this machine (0.0.0.0 or '': "
                                                             "every IPv4 interface, :: every IPv6 one)."})
    port: int = field(default=8000, metadata={"help": "TCP port (0: any free port, printed at start)."})
    api_key: str | None = field(
        default=None, metadata={"help": "Clients must send `Authorization: Bearer KEY` to /v1/ routes (401 "
                                        "otherwise). Default: the MEDTUNE_API_KEY environment variable; none: no key."},
    )
    served_model_name: str | None = field(
        default=None, metadata={"help": "The model id /v1/models lists (default: the model folder's name). Requests "
                                        "may name any model: this server has one."},
    )
    max_batch_size: int = field(default=16, metadata={"help": "Most replies decoded together in one batch."})
    batch_wait_ms: float = field(
        default=5.0, metadata={"help": "After the first request of an idle period, wait this long for others to "
                                       "start in the same batch."},
    )
    batching: bool = field(
        default=True, metadata={"help": "false: one reply at a time (what batching buys, for benchmarks)."}
    )
    max_queue: int = field(
        default=64, metadata={"help": "Replies that may wait beyond the running batch; more get 429 (retry later)."}
    )
    max_tokens_limit: int = field(
        default=1024, metadata={"help": "The largest max_tokens a request may ask (more: 400), and the reply length "
                                        "when a request gives none."},
    )
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "Larger request bodies get 413."})
    log_content: bool = field(
        default=False, metadata={"help": "Also log prompts and replies; by default a request is logged without its "
                                         "content (route, token counts, time)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.api_key is None:
            self.api_key = os.environ.get("MEDTUNE_API_KEY") or None
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if min(self.max_batch_size, self.max_tokens_limit, self.max_body_bytes) < 1 or self.max_queue < 0:
            raise ConfigError("max_batch_size, max_tokens_limit and max_body_bytes must be >= 1, max_queue >= 0")
        if self.batch_wait_ms < 0:
            raise ConfigError("batch_wait_ms must be >= 0")


@dataclass
class PredictArguments(BackendArguments, SystemPromptArguments):
    """`medtune predict`: replies for every prompt or conversation of a file."""

    input: str = field(
        default="", metadata={"help": "A .jsonl/.json file of prompts: {id, prompt[, system]}, ShareGPT "
                                      "{conversations}, OpenAI {messages} or Alpaca {instruction[, input, system, "
                                      "history]}. A conversation that ends with an assistant turn is answered "
                                      "again from the turn before it. id: the record's id, else its line number."},
    )
    output: str = field(
        default="", metadata={"help": "The .jsonl file of replies, one line {id, replies} per input record. Appended "
                                      "to: a re-run skips the ids already there (a line cut by a kill is redone)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call (greedy decoding)."})

    def __post_init__(self):
        super().__post_init__()
        if not self.input or not self.output:
            raise ConfigError("predict needs --input FILE.jsonl and --output FILE.jsonl")
        if self.batch_size < 1:
            raise ConfigError("batch_size must be >= 1")

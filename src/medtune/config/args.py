"""Configuration dataclasses shared by every stage.

Names follow MedicalGPT and the book where they exist, so existing YAML and shell scripts keep working.
Each option is declared once here; a stage combines the dataclasses it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from medtune.errors import ConfigError

TORCH_DTYPES = ("auto", "float32", "bfloat16", "float16")
# The book passes --model_type chatglm/glm4/qwen/llama; we accept them for compatibility and use them only for
# sanity checks, since the model's own config.json says what it is.
MODEL_TYPES = ("auto", "chatglm", "glm", "glm4", "qwen", "qwen2", "llama", "llama3")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


@dataclass
class ModelArguments:
    """Which model and tokenizer to load, and how."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Local model directory (or hub id with network). Default: the embedded tiny GLM-4 model, "
                          "built on first use.", "aliases": ["--model"]},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer directory if it differs from the model's."}
    )
    model_type: str = field(default="auto", metadata={"help": f"Accepted for compatibility: {', '.join(MODEL_TYPES)}."})
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype: auto (bf16/fp16 when that flag is set, else float32), float32, "
                          "bfloat16, float16."},
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
                          "tokenizer's own chat_template. Training, evaluation and inference all render with it."},
    )

    def __post_init__(self):
        _check_choice("torch_dtype", self.torch_dtype, TORCH_DTYPES)
        _check_choice("model_type", self.model_type, MODEL_TYPES)


@dataclass
class LoraArguments:
    """LoRA through peft (the default) or full fine-tuning (`--use_peft false`)."""

    use_peft: bool = field(default=True, metadata={"help": "Train a LoRA adapter; false trains every weight."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt, e.g. q_proj v_proj. Default (or 'all'): every linear layer "
                          "except the output head."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling alpha (effective scale alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved with the adapter, e.g. embed_tokens lm_head."}
    )

    def __post_init__(self):
        if self.lora_rank <= 0:
            raise ConfigError(f"lora_rank must be positive, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")


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
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
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


SFT_FORMATS = ("auto", "sharegpt", "openai", "alpaca")


@dataclass
class SFTDataArguments(DataArguments):
    """Conversations for supervised fine-tuning, and how they become token ids and labels."""

    data_format: str = field(
        default="auto", metadata={"help": f"Record format: {', '.join(SFT_FORMATS)} (auto detects it per file)."}
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "Longest tokenized conversation; longer ones are cut at the end (samples "
                                        "left with no supervised token are dropped and counted)."},
    )
    train_on_prompt: bool = field(
        default=False, metadata={"help": "Also compute the loss on system/user turns and template scaffolding."}
    )
    packing: bool = field(
        default=True,
        metadata={"help": "Pack several conversations into each sequence (position ids restart per conversation and "
                          "attention never crosses conversations). Off: length-grouped, padded batches."},
    )

    def __post_init__(self):
        super().__post_init__()
        _check_choice("data_format", self.data_format, SFT_FORMATS)
        if self.model_max_length < 8:
            raise ConfigError(f"model_max_length must be at least 8, got {self.model_max_length}")


PREFERENCE_FORMATS = ("auto", "preference", "preference_conversations", "preference_hf")


@dataclass
class PreferenceDataArguments(DataArguments):
    """Preference pairs: the book's system/history/question/response_chosen/response_rejected records,
    conversations + chosen/rejected, or Hugging Face prompt/chosen/rejected."""

    data_format: str = field(
        default="auto", metadata={"help": f"Record format: {', '.join(PREFERENCE_FORMATS)} (auto detects it per file)."}
    )
    max_length: int = field(
        default=1024,
        metadata={"help": "Longest prompt+answer in tokens. Longer pairs are truncated, never dropped: the prompt "
                          "keeps its end (at least half the budget if the answers need it) and both answers are cut "
                          "at the end to the rest. Truncated pairs are counted."},
    )

    def __post_init__(self):
        super().__post_init__()
        _check_choice("data_format", self.data_format, PREFERENCE_FORMATS)
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
                          "if there is none)."},
    )
    early_stopping_patience: int | None = field(
        default=None,
        metadata={"help": "Stop after this many evaluations without a lower eval loss (needs an eval set); the "
                          "best checkpoint is loaded at the end."},
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
        if self.bf16 and not self.use_cpu and not _bf16_accelerator():
            # the shipped GPU configs set bf16; transformers' own error does not say what to change
            raise ConfigError("bf16: true needs a GPU with bfloat16 support and none was found; on this machine "
                              "pass --bf16 false (and --torch_dtype float32) to train in float32")
        super().__post_init__()


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
    beta: float = field(default=0.1, metadata={"help": "Strength of the KL penalty / reward scale (all methods)."})
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={"help": "Compute reference log-probs once before training (cached on disk by model and data, "
                          "reused by re-runs and other loss types): no reference forward pass per step."},
    )
    simpo_gamma: float = field(default=0.5, metadata={"help": "SimPO target reward margin."})
    cpo_alpha: float = field(default=0.0, metadata={"help": "SimPO/CPO: weight of the NLL term on chosen answers."})

    def __post_init__(self):
        if self.loss_type == "dpo":  # what most people call the sigmoid loss
            self.loss_type = "sigmoid"
        _check_choice("loss_type", self.loss_type, PREFERENCE_METHODS)
        super().__post_init__()


EVAL_MODES = ("auto", "likelihood", "generate")


@dataclass
class EvalArguments:
    """What to evaluate, against what, and how (all `medtune eval` commands)."""

    adapter_name_or_path: str | None = field(
        default=None, metadata={"help": "A LoRA adapter applied to the model without merging."}
    )
    endpoint: str | None = field(
        default=None, metadata={"help": "An OpenAI-compatible server (e.g. http://127.0.0.1:8000) instead of a local "
                                        "model; generate mode only."},
    )
    endpoint_model: str = field(default="default", metadata={"help": "The model name sent to the endpoint."})
    data_dir: str | None = field(
        default=None, metadata={"help": "CMB folder with test.json, test_answers.json, val.json, clin.json (default: "
                                        "the bundled data/eval/cmb), or a file.", "aliases": ["--data"]},
    )
    split: str = field(default="test", metadata={"help": "cmb-exam: test or val."})
    answers_file: str | None = field(
        default=None, metadata={"help": "Answer key keyed by id (default: <data_dir>/test_answers.json for test)."}
    )
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where answers and results are written."})
    mode: str = field(
        default="auto", metadata={"help": "likelihood (compare option scores; local models), generate (decode and "
                                          "extract), or auto (likelihood locally, generate for an endpoint)."},
    )
    cot: bool = field(default=False, metadata={"help": "Chain-of-thought prompt (official CoT wording)."})
    shots: int = field(default=0, metadata={"help": "Few-shot examples from the val split (with explanations)."})
    official: bool = field(
        default=False, metadata={"help": "Reproduce the official scripts' quirks (drop one-character options; "
                                         "collect every A-G letter when the answer pattern misses)."},
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
    block_size: int = field(default=512, metadata={"help": "ppl: tokens per evaluation block."})

    def __post_init__(self):
        _check_choice("mode", self.mode, EVAL_MODES)
        _check_choice("split", self.split, ("test", "val"))
        if self.shots < 0 or self.batch_size < 1:
            raise ConfigError("shots must be >= 0 and batch_size >= 1")


@dataclass
class MergeArguments:
    """Fold a LoRA adapter into its base model and save a standalone model."""

    base_model: str | None = field(default=None, metadata={"help": "The base model directory (default: the "
                                                                    "base recorded in the adapter)."})
    lora_model: str = field(default="", metadata={"help": "The LoRA adapter directory (e.g. a pt output_dir)."})
    output_dir: str = field(default="", metadata={"help": "Where the merged model goes (must not be the base "
                                                         "model's folder)."})
    model_type: str = field(default="auto", metadata={"help": f"Accepted for compatibility: {', '.join(MODEL_TYPES)}."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Tokenizer to save with the merged model "
                                                                       "(default: the adapter's, else the base's)."})
    torch_dtype: str = field(default="auto", metadata={"help": "dtype of the saved weights (auto: the base's)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code shipped in the model folder."})
    check_tolerance: float = field(
        default=1e-4, metadata={"help": "Largest allowed |logit difference| between base+adapter and the merged "
                                        "model on a probe input (checked in float32)."},
    )

    def __post_init__(self):
        if not self.lora_model:
            raise ConfigError("merge needs --lora_model (the adapter folder)")
        if not self.output_dir:
            raise ConfigError("merge needs --output_dir (a new folder for the merged model)")
        _check_choice("model_type", self.model_type, MODEL_TYPES)
        _check_choice("torch_dtype", self.torch_dtype, TORCH_DTYPES)

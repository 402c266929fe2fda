"""Pieces every training stage shares: output folder and resume policy, TensorBoard location, evaluation
metrics (perplexity, token accuracy), early stopping and the result files a finished stage leaves behind."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
from transformers import EarlyStoppingCallback, Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from medtune.config import save_effective_config
from medtune.errors import ConfigError

logger = logging.getLogger(__name__)

TRUE_WORDS = {"true", "yes", "1", "latest", "last"}


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """checkpoint-N folders whose trainer_state.json (written last by the Trainer) is readable, oldest first.

    A run killed while saving leaves a half-written folder; resuming from it would fail, so it is skipped.
    """
    found = []
    for folder in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = folder.name.rsplit("-", 1)[-1]
        state = folder / "trainer_state.json"
        if not (suffix.isdigit() and state.is_file()):
            continue
        try:
            json.loads(state.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        found.append((int(suffix), folder))
    return [folder for _, folder in sorted(found)]


def resolve_resume_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: an explicit folder, or the latest in output_dir for 'true'.

    A fresh run into a folder that already holds checkpoints is refused: its checkpoints would be mixed with and
    rotated out by the new run's.
    """
    output_dir = Path(training_args.output_dir)
    complete = complete_checkpoints(output_dir)
    latest = str(complete[-1]) if complete else None
    requested = training_args.resume_from_checkpoint
    if requested is None or str(requested).lower() in {"false", "no", "0", "none", ""}:
        if any(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
            raise ConfigError(f"{output_dir} already holds checkpoints; pass "
                              "--resume_from_checkpoint true to continue that run, or choose a new output_dir")
        return None
    if str(requested).lower() in TRUE_WORDS:
        if latest is None:
            logger.info("resume requested but %s has no checkpoint yet: starting from scratch", output_dir)
        else:
            skipped = [f.name for f in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if f not in complete]
            if skipped:
                logger.warning("skipping incomplete checkpoint folders (killed while saving?): %s", ", ".join(skipped))
            logger.info("resuming from %s", latest)
        return latest
    if not (Path(requested) / "trainer_state.json").is_file():
        raise ConfigError(f"{requested}: not a checkpoint folder (no trainer_state.json); pass a checkpoint-N "
                          "folder or 'true' for the latest in output_dir")
    return str(requested)


def prepare_training(training_args) -> str | None:
    """Seed, TensorBoard folder and resume checkpoint, decided before any model is built."""
    resume = resolve_resume_checkpoint(training_args)
    # Seed before the model and adapter are created so LoRA initialisation is reproducible too.
    set_seed(training_args.seed)
    # transformers 5 takes TensorBoard's folder from this variable (logging_dir is gone).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(training_args.output_dir) / "runs")
    return resume


def start_stage(model_args, training_args, configs: tuple):
    """What every training stage does first: seed, TensorBoard folder and resume checkpoint; the model path really
    used (recorded in the saved config); the tokenizer. Returns (resume checkpoint, model path, tokenizer)."""
    from medtune.models.loader import load_tokenizer, resolve_model_path

    resume = prepare_training(training_args)
    model_path = resolve_model_path(model_args.model_name_or_path)
    model_args.model_name_or_path = model_path
    save_run_config(training_args, configs)
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_path, model_args.trust_remote_code)
    return resume, model_path, tokenizer


def load_training_model(model_path: str, model_args, training_args):
    """The model to train, in the dtype the precision flags imply, with the KV cache off (useless in training,
    and packed rows need it off to keep conversations apart)."""
    from medtune.models.loader import load_model

    model = load_model(model_path, torch_dtype=model_args.torch_dtype, trust_remote_code=model_args.trust_remote_code,
                       attn_implementation=model_args.attn_implementation, bf16=training_args.bf16,
                       fp16=training_args.fp16)
    model.config.use_cache = False
    if training_args.gradient_checkpointing:
        # the reentrant variant needs inputs that require grad, which a frozen base under LoRA does not give
        training_args.gradient_checkpointing_kwargs = training_args.gradient_checkpointing_kwargs or {
            "use_reentrant": False}
    return model


def configure_evaluation(training_args, has_eval_set: bool) -> list:
    """Turn evaluation off when there is nothing to evaluate; return the callbacks evaluation needs."""
    from transformers.trainer_utils import IntervalStrategy

    if not has_eval_set:
        if training_args.early_stopping_patience is not None:
            raise ConfigError("early_stopping_patience needs an evaluation set (validation_file_dir or "
                              "validation_split_percentage > 0)")
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.eval_on_start = False
        return []
    if training_args.early_stopping_patience is not None:
        return [EarlyStoppingCallback(early_stopping_patience=training_args.early_stopping_patience)]
    return []


def argmax_logits(logits, labels):
    """Keep only predicted ids during evaluation; storing full logits would cost vocab-size memory per token."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def token_accuracy(eval_prediction) -> dict[str, float]:
    """Next-token accuracy over supervised positions (labels are shifted by one, as in the causal LM loss)."""
    predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
    predictions, labels = np.asarray(predictions)[:, :-1], np.asarray(labels)[:, 1:]
    mask = labels != -100
    total = int(mask.sum())
    return {"token_accuracy": float((predictions[mask] == labels[mask]).sum() / total) if total else 0.0}


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


class MedtuneTrainer(Trainer):
    """The transformers Trainer, reporting perplexity next to every evaluation loss."""

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None:
            output.metrics[f"{prefix}_perplexity"] = perplexity(loss)
        return output


def logged_before_training(log_history: list[dict], key: str):
    """The value of `key` from the evaluation at step 0 (eval_on_start), if there was one."""
    return next((entry[key] for entry in log_history if key in entry and entry.get("step") == 0), None)


def save_run_config(training_args, configs: tuple) -> None:
    """Write the effective config first, so even an interrupted run says how it was started."""
    if training_args.process_index == 0:
        save_effective_config(training_args.output_dir, *configs)


def finish_training(trainer, train_result, tokenizer, extra: dict | None = None, chat_template: str | None = None) -> dict:
    """Save the model/adapter, tokenizer (with the chat template it was trained with), metrics and log history.

    Returns the final evaluation metrics (empty without an eval set). Only the main process writes.
    """
    output_dir = Path(trainer.args.output_dir)
    trainer.save_model(str(output_dir))
    metrics = dict(train_result.metrics)
    # Preference trainers log rewards/* per step; the last values belong with the run's results.
    for entry in trainer.state.log_history:
        metrics.update({key: value for key, value in entry.items() if key.startswith("rewards/")})
    main_process = trainer.is_world_process_zero()
    if main_process:
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics, combined=False)
    eval_metrics: dict = {}
    if trainer.eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        before = logged_before_training(trainer.state.log_history, "eval_loss")
        if before is not None:
            eval_metrics["eval_loss_before_training"] = before
            eval_metrics["eval_perplexity_before_training"] = perplexity(before)
        if main_process:
            trainer.log_metrics("eval", eval_metrics)
            trainer.save_metrics("eval", eval_metrics, combined=False)
    trainer.save_state()
    if main_process:
        if chat_template:
            # A forced --template becomes the saved tokenizer's own, so chat/serve/eval render exactly as trained.
            tokenizer.chat_template = chat_template
        tokenizer.save_pretrained(str(output_dir))
        if extra:
            for name, payload in extra.items():
                (output_dir / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return eval_metrics

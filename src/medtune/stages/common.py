"""Pieces every training stage shares: output folder and resume policy, TensorBoard location, evaluation
metrics (perplexity, token accuracy), early stopping and the result files a finished stage leaves behind."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from transformers import EarlyStoppingCallback, Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from medtune.config import save_effective_config
from medtune.errors import (
    ConfigError,
    byte_size,
    failed_write_reported,
    file_named_by,
    free_space,
)

logger = logging.getLogger(__name__)

TRUE_WORDS = {"true", "yes", "1", "latest", "last"}
# Files only a finished run leaves in output_dir (checkpoints live in checkpoint-N/ subfolders).
FINISHED_RUN_FILES = ("adapter_model.safetensors", "adapter_model.bin", "model.safetensors",
                      "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
                      "train_results.json")
# The final model is written here first and moved into output_dir only once complete.
STAGING_FOLDER = ".medtune-saving"


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


def finished_run_files(output_dir: Path) -> list[str]:
    return [name for name in FINISHED_RUN_FILES if (output_dir / name).is_file()]


def refuse_finished_run(output_dir: Path, reason: str) -> None:
    """A new run would overwrite the adapter or model a finished run left in output_dir: refuse, saying how on."""
    found = finished_run_files(output_dir)
    if found:
        raise ConfigError(f"{output_dir}: already holds a finished run ({', '.join(found)}) {reason}; choose a new "
                          "--output_dir, or move that run away first")


def resolve_resume_checkpoint(training_args) -> str | None:
    """The checkpoint to resume from: an explicit folder, or the latest in output_dir for 'true'.

    A fresh run into a folder that already holds checkpoints is refused: its checkpoints would be mixed with and
    rotated out by the new run's. So is a fresh run into a folder holding a finished run (e.g. one trained with
    --save_strategy no): it would overwrite that run's adapter or model.
    """
    output_dir = Path(training_args.output_dir)
    complete = complete_checkpoints(output_dir)
    latest = str(complete[-1]) if complete else None
    requested = training_args.resume_from_checkpoint
    if requested is None or str(requested).lower() in {"false", "no", "0", "none", ""}:
        if any(output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
            raise ConfigError(f"{output_dir} already holds checkpoints; pass "
                              "--resume_from_checkpoint true to continue that run, or choose a new output_dir")
        refuse_finished_run(output_dir, "that this run would overwrite")
        return None
    if str(requested).lower() in TRUE_WORDS:
        if latest is None:
            refuse_finished_run(output_dir, "and no checkpoint to resume from")
            logger.info("resume requested but %s has no checkpoint yet: starting from scratch", output_dir)
        else:
            skipped = [f.name for f in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if f not in complete]
            if skipped:
                logger.warning("skipping incomplete checkpoint folders (killed while saving?): %s", ", ".join(skipped))
            logger.info("resuming from %s", latest)
        return latest
    state = Path(requested) / "trainer_state.json"
    if not state.is_file():
        raise ConfigError(f"{requested}: not a checkpoint folder (no trainer_state.json); pass a checkpoint-N "
                          "folder or 'true' for the latest in output_dir")
    check_trainer_state(state)
    return str(requested)


def check_trainer_state(state: Path) -> None:
    """A checkpoint killed while saving has a cut trainer_state.json: name it instead of a JSONDecodeError."""
    advice = "the checkpoint is incomplete (killed while saving?); pass an earlier checkpoint-N or 'true'"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{state}:{exc.lineno}: invalid JSON ({exc.msg}); {advice}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{state}: not valid UTF-8; {advice}") from None


def prepare_training(training_args) -> str | None:
    """Seed, TensorBoard folder and resume checkpoint, decided before any model is built."""
    resume = resolve_resume_checkpoint(training_args)
    # Seed before the model and adapter are created so LoRA initialisation is reproducible too.
    set_seed(training_args.seed)
    # transformers 5 takes TensorBoard's folder from this variable (logging_dir is gone).
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(Path(training_args.output_dir) / "runs")
    return resume


def log_process_group(training_args) -> None:
    """One line per process under a launcher, so a log shows that every rank joined the same run."""
    if training_args.world_size > 1:
        logger.info("distributed run: process %d of %d (local %d) on %s, backend %s, %s", training_args.process_index,
                    training_args.world_size, training_args.local_process_index, training_args.device,
                    training_args.distributed_state.backend, training_args.parallel_mode.value)


# Effective configs of stages started in this process, written once their model has loaded (see save_run_config).
_configs_to_save: dict[int, tuple] = {}


def start_stage(model_args, training_args, configs: tuple):
    """What every training stage does first: refuse an output folder that would overwrite the base model or a
    finished run; seed, TensorBoard folder and resume checkpoint; the model path really used (recorded in the saved
    config); the tokenizer. Returns (resume checkpoint, model path, tokenizer)."""
    from medtune.models.loader import load_tokenizer, refuse_output_in_model_folder, resolve_model_path

    model_path = resolve_model_path(model_args.model_name_or_path)
    model_args.model_name_or_path = model_path
    refuse_output_in_model_folder(training_args.output_dir, model_path, model_args.tokenizer_name_or_path)
    resume = prepare_training(training_args)
    log_process_group(training_args)
    _configs_to_save[id(training_args)] = configs
    if training_args.local_process_index != 0:
        # Under a launcher the node's main process (re)builds the tokenized cache inside main_process_first and
        # the others then read it; a rebuild by each of them would delete the folder the others are reading.
        for config in configs:
            if getattr(config, "overwrite_cache", False):
                config.overwrite_cache = False
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_path, model_args.trust_remote_code)
    return resume, model_path, tokenizer


def load_training_model(model_path: str, model_args, training_args):
    """The model to train, in the dtype the precision flags imply, with the KV cache off (useless in training,
    and packed rows need it off to keep conversations apart). Once it has loaded, the data has been validated
    too, so the run's effective config is written now."""
    from medtune.config import LoraArguments
    from medtune.models.loader import load_model, quantization_config, resolve_dtype

    configs = _configs_to_save.pop(id(training_args), None) or ()
    lora_args = next((c for c in configs if isinstance(c, LoraArguments)), None)
    compute_dtype = resolve_dtype(model_args.torch_dtype, training_args.bf16, training_args.fp16)
    quantization = quantization_config(lora_args, compute_dtype) if lora_args else None
    model = load_model(model_path, torch_dtype=model_args.torch_dtype, trust_remote_code=model_args.trust_remote_code,
                       attn_implementation=model_args.attn_implementation, bf16=training_args.bf16,
                       fp16=training_args.fp16, quantization=quantization)
    if configs:
        save_run_config(training_args, configs)
    model.config.use_cache = False
    # --gradient_checkpointing arrives as transformers 5's activation_checkpointing (see StageTrainingArguments)
    if training_args.activation_checkpointing:
        # the reentrant variant needs inputs that require grad, which a frozen base under LoRA does not give
        training_args.activation_checkpointing_kwargs = training_args.activation_checkpointing_kwargs or {
            "use_reentrant": False}
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        # freezes the base, upcasts the unquantised weights (norms, embeddings, head) to float32 for stable
        # training, and turns on gradient checkpointing only if it was asked for
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=bool(training_args.activation_checkpointing),
            gradient_checkpointing_kwargs=training_args.activation_checkpointing_kwargs)
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


def disk_full_reported(target: Path, partial: Path, needed: Callable[[], int], what_is_left: Callable[[], str]):
    """Turn a full disk while writing `target` into one line naming the file, the space needed and what is left;
    `partial` (the unfinished folder) is removed first so nothing half-written can be mistaken for a result.
    `needed` and `what_is_left` are only worked out when the disk is full."""
    def describe(exc: BaseException) -> str:
        shutil.rmtree(partial, ignore_errors=True)
        return (f"{file_named_by(exc, target)}: no space left on device (about {byte_size(needed())} needed, "
                f"{byte_size(free_space(target))} free); the unfinished {partial.name} was removed, {what_is_left()}; "
                "free some space and run again with --resume_from_checkpoint true")

    return failed_write_reported(describe)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def saved_weight_bytes(model) -> int:
    """What save_model writes: the trainable (adapter) weights under peft, else every weight."""
    parameters = list(model.parameters())
    if hasattr(model, "peft_config"):
        parameters = [p for p in parameters if p.requires_grad]
    return _tensor_bytes(parameters)


class MedtuneTrainer(Trainer):
    """The transformers Trainer, reporting perplexity next to every evaluation loss (its loss is a language
    model's), and naming the file when the disk fills up while a checkpoint is saved."""

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        loss = output.metrics.get(f"{prefix}_loss")
        if loss is not None:
            output.metrics[f"{prefix}_perplexity"] = perplexity(loss)
        return output

    def _save_checkpoint(self, model, trial):
        import torch

        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        def needed() -> int:
            optimizer_state = getattr(self.optimizer, "state", None) or {}
            moments = [t for state in optimizer_state.values() for t in state.values() if torch.is_tensor(t)]
            return saved_weight_bytes(self.model) + _tensor_bytes(moments)

        def previous() -> str:
            earlier = [p for p in complete_checkpoints(run_dir) if p != folder]
            return f"the previous checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"

        with disk_full_reported(folder, folder, needed, previous):
            super()._save_checkpoint(model, trial)


def logged_before_training(log_history: list[dict], key: str):
    """The value of `key` from the evaluation at step 0 (eval_on_start), if there was one."""
    return next((entry[key] for entry in log_history if key in entry and entry.get("step") == 0), None)


def save_run_config(training_args, configs: tuple) -> None:
    """Write the effective config once the output folder is known to be usable (checked, data valid, model
    loaded) and before training, so even an interrupted run says how it was started."""
    if training_args.process_index == 0:
        save_effective_config(training_args.output_dir, *configs)


def whole_run_train_loss(log_history: list[dict], resumed_at: int, last_step: int, loss_since_resume: float) -> float:
    """The mean training loss over every step of a run resumed at step `resumed_at`.

    The Trainer averages only the steps it ran itself; the steps before the resume are in the checkpoint's log
    history, each logged loss the mean over the steps since the previous one. Steps before the resume that were
    never logged (logging_steps not dividing the checkpoint step) cannot be recovered and are left out.
    """
    total, covered, previous = 0.0, 0, 0
    for entry in log_history:
        step = entry.get("step", 0)
        if "loss" in entry and previous < step <= resumed_at:
            total += entry["loss"] * (step - previous)
            covered += step - previous
            previous = step
    if covered < resumed_at:
        logger.warning("train_loss leaves out steps %d-%d: their loss was not logged before the resume",
                       covered + 1, resumed_at)
    steps_since = last_step - resumed_at
    return (total + loss_since_resume * steps_since) / max(covered + steps_since, 1)


def correct_train_loss_after_resume(trainer, metrics: dict) -> None:
    resumed_at = getattr(trainer, "_initial_global_step", 0)  # where this train() call started
    if not resumed_at or "train_loss" not in metrics:
        return
    whole = whole_run_train_loss(trainer.state.log_history, resumed_at, trainer.state.global_step,
                                 metrics["train_loss"])
    metrics["train_loss"] = whole
    for entry in trainer.state.log_history:  # the summary the Trainer logged, saved in trainer_state.json
        if "train_loss" in entry:
            entry["train_loss"] = whole


def save_final_model(trainer, output_dir: Path) -> None:
    """Save into a staging folder and move the files into output_dir once all are written: a failed save (full
    disk) leaves output_dir as it was."""
    # Every process takes part in save_model (ZeRO-3 and FSDP gather the sharded weights there); only the main one
    # writes, so only it prepares and moves the staging folder.
    staging = output_dir / STAGING_FOLDER
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed while saving
    with disk_full_reported(output_dir, staging, lambda: saved_weight_bytes(trainer.model),
                            lambda: "the checkpoints are intact"):
        trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        for item in staging.iterdir():
            os.replace(item, output_dir / item.name)
        staging.rmdir()


def stop_token_ids(chat_template) -> list[int]:
    return list(getattr(chat_template, "stop_token_ids", None) or [])


def save_generation_config(model, output_dir: Path, stop_ids: list[int]) -> None:
    """generation_config.json with the chat template's stop ids added to eos_token_id, so vLLM and plain
    `generate()` stop where the model was taught to; written for adapters too (peft saves none)."""
    import copy

    from transformers import GenerationConfig

    from medtune.models.loader import add_stop_ids

    config = getattr(model, "generation_config", None)
    config = copy.deepcopy(config) if config is not None else GenerationConfig.from_model_config(model.config)
    add_stop_ids(config, stop_ids)
    # written as is: save_pretrained refuses a modified config whose sampling settings it finds inconsistent, which
    # some published models ship (e.g. a temperature with do_sample false), and the run is done by now
    config.to_json_file(str(output_dir / "generation_config.json"), use_diff=True)


def finish_training(trainer, train_result, tokenizer, extra: dict | None = None, chat_template=None) -> dict:
    """Save the model/adapter, tokenizer (with the chat template it was trained with), generation config (with the
    template's stop ids), metrics and log history.

    `chat_template` is the stage's ChatTemplate (or its Jinja text). Returns the final evaluation metrics (empty
    without an eval set). Only the main process writes.
    """
    output_dir = Path(trainer.args.output_dir)
    save_final_model(trainer, output_dir)
    metrics = dict(train_result.metrics)
    correct_train_loss_after_resume(trainer, metrics)
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
            # Only a language model's loss has a perplexity; exp(DPO loss) would be a meaningless number.
            if isinstance(trainer, MedtuneTrainer):
                eval_metrics["eval_perplexity_before_training"] = perplexity(before)
        if main_process:
            trainer.log_metrics("eval", eval_metrics)
            trainer.save_metrics("eval", eval_metrics, combined=False)
    trainer.save_state()
    if main_process:
        save_generation_config(trainer.model, output_dir, stop_token_ids(chat_template))
        jinja = getattr(chat_template, "jinja", chat_template)
        if jinja:
            # A forced --template becomes the saved tokenizer's own, so chat/serve/eval render exactly as trained.
            tokenizer.chat_template = jinja
        tokenizer.save_pretrained(str(output_dir))
        if extra:
            for name, payload in extra.items():
                (output_dir / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False), encoding="utf-8")
    return eval_metrics

"""`medtune dpo`: preference optimisation with TRL — DPO and its loss variants, ORPO, SimPO and KTO.

pairs -> ChatTemplate (the same rendering as sft and inference) -> TRL trainer. With LoRA the reference model is
the base with the adapter disabled (one copy of the weights); `precompute_ref_log_probs` removes the reference
forward pass from every step and caches the result on disk.
"""

from __future__ import annotations

import dataclasses
import logging

from medtune.config import DPOTrainingArguments, LoraArguments, ModelArguments, PreferenceDataArguments
from medtune.config.args import DPO_LOSSES

logger = logging.getLogger(__name__)

ARGUMENT_TYPES = (ModelArguments, LoraArguments, PreferenceDataArguments, DPOTrainingArguments)
DESCRIPTION = ("Preference optimisation on chosen/rejected pairs: --loss_type sigmoid (DPO), ipo, hinge, ..., "
               "orpo, simpo or kto; LoRA with the base as reference, or full fine-tuning.")


def trl_arguments(config_class, training_args: DPOTrainingArguments, **overrides):
    """The TRL config for a method: every Trainer option from our arguments, plus the method's own."""
    from transformers import TrainingArguments

    values = {f.name: getattr(training_args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values.update(overrides)
    return config_class(**values)


def method_trainer(training_args: DPOTrainingArguments, max_length: int):
    """(TRL trainer class fed medtune's ids, its config) for `loss_type`, with every preference option set."""
    from medtune.data.preference import ids_fed_cpo_family, ids_fed_dpo, ids_fed_kto

    method = training_args.loss_type
    common = {"max_length": max_length, "beta": training_args.beta}
    if method in DPO_LOSSES:
        from trl import DPOConfig, DPOTrainer

        losses, weights = [method], None
        if training_args.rpo_alpha is not None:  # RPO: the chosen answers' NLL as a second, weighted loss term
            losses, weights = [method, "sft"], [1.0, training_args.rpo_alpha]
        args = trl_arguments(DPOConfig, training_args, loss_type=losses, loss_weights=weights,
                             label_smoothing=training_args.label_smoothing, train_sampling_strategy="group_by_length",
                             precompute_ref_log_probs=training_args.precompute_ref_log_probs, **common)
        from medtune.stages.pair_packing import packed_pairs_dpo

        return packed_pairs_dpo(ids_fed_dpo(DPOTrainer), enabled=training_args.loss_only_labels), args
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        # Sequential: the KL term pairs neighbouring rows, which medtune has already shuffled by the seed.
        args = trl_arguments(KTOConfig, training_args, precompute_ref_log_probs=training_args.precompute_ref_log_probs,
                             desirable_weight=training_args.desirable_weight,
                             undesirable_weight=training_args.undesirable_weight,
                             train_sampling_strategy="sequential", **common)
        return ids_fed_kto(KTOTrainer), args
    if method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        return ids_fed_cpo_family(ORPOTrainer), trl_arguments(ORPOConfig, training_args, **common)
    from trl.experimental.cpo import CPOConfig, CPOTrainer  # simpo: the CPO family's reference-free loss

    args = trl_arguments(CPOConfig, training_args, loss_type="simpo", simpo_gamma=training_args.simpo_gamma,
                         cpo_alpha=training_args.cpo_alpha, label_smoothing=training_args.label_smoothing, **common)
    return ids_fed_cpo_family(CPOTrainer), args


def build_trainer(training_args, data_args, model, tokenizer, train_set, eval_set, peft_config):
    """The TRL trainer for `loss_type` on datasets from `build_preference_split`."""
    from medtune.models.fast_lora import use_fast_lora

    trainer_class, args = method_trainer(training_args, data_args.max_length)
    extra = {"ref_model": None} if training_args.loss_type in DPO_LOSSES else {}
    trainer = trainer_class(model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
                            train_dataset=train_set, eval_dataset=eval_set, **extra)
    use_fast_lora(trainer.model)  # the trainer attached the adapter (peft_config)
    return trainer


def prepare_preference_data(training_args, data_args, template, train_pairs, eval_pairs) -> tuple:
    """(train set, eval set or None, statistics), encoded once by the main process and cached; other torchrun
    ranks wait and then load the cache."""
    from medtune.data.preference import build_preference_split

    with training_args.main_process_first(desc="encoding preference pairs"):
        train_set, stats = build_preference_split(train_pairs, template, data_args, training_args)
        eval_set, eval_stats = (build_preference_split(eval_pairs, template, data_args, training_args, "eval")
                                if eval_pairs else (None, None))
    return train_set, eval_set, {"train": stats.to_dict(), **({"eval": eval_stats.to_dict()} if eval_stats else {})}


def run_dpo(model_args: ModelArguments, lora_args: LoraArguments, data_args: PreferenceDataArguments,
            training_args: DPOTrainingArguments) -> dict:
    """Train and save into training_args.output_dir; returns the final evaluation metrics."""
    import os

    from medtune.data.preference import load_pairs
    from medtune.models.loader import load_chat_template, lora_config
    from medtune.stages.common import configure_evaluation, finish_training, load_training_model, start_stage

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # Every pair is validated before anything is written, and encoded before the model is loaded.
    train_pairs, eval_pairs, dropped = load_pairs(data_args)
    resume, model_path, tokenizer = start_stage(model_args, training_args,
                                                (model_args, lora_args, data_args, training_args))
    template = load_chat_template(model_path, tokenizer, model_args.template, data_args.system_prompt)
    train_set, eval_set, stats = prepare_preference_data(training_args, data_args, template, train_pairs, eval_pairs)
    callbacks = configure_evaluation(training_args, eval_set is not None)

    model = load_training_model(model_path, model_args, training_args)
    peft_config = lora_config(lora_args) if lora_args.use_peft else None
    trainer = build_trainer(training_args, data_args, model, tokenizer, train_set, eval_set, peft_config)
    stats.update({"dropped_identical": dropped, "loss_type": training_args.loss_type, "template": template.name})
    logger.info("preference pairs: %s", stats)
    for callback in callbacks:
        trainer.add_callback(callback)
    train_result = trainer.train(resume_from_checkpoint=resume)
    return finish_training(trainer, train_result, tokenizer, extra={"data_stats.json": stats},
                           chat_template=template)

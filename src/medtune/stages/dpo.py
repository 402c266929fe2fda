"""`medtune dpo`: preference optimisation with TRL — DPO and its loss variants, ORPO, SimPO and KTO.

pairs -> ChatTemplate (the same rendering as sft and inference) -> TRL trainer. With LoRA the reference model is
the base with the adapter disabled (one copy of the weights); `precompute_ref_log_probs` removes the reference
forward pass from every step and caches the result on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import random

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


def build_trainer(training_args, data_args, model, tokenizer, template, train_pairs, eval_pairs, peft_config):
    """The TRL trainer for `loss_type`, its datasets prepared the way that trainer reads them. Returns
    (trainer, data statistics)."""
    from medtune.data.cache import tokenizer_fingerprint
    from medtune.data.preference import (
        cached_dataset,
        encode_pairs,
        pretokenized,
        render_pairs,
        unpaired_rows,
    )

    method = training_args.loss_type
    common = {"max_length": data_args.max_length, "beta": training_args.beta}
    if method in DPO_LOSSES:
        from trl import DPOConfig, DPOTrainer

        class PretokenizedDPOTrainer(DPOTrainer):
            """DPOTrainer fed ids from our ChatTemplate, so pairs render exactly as in sft and at inference, with a
            `length` column kept for length-grouped batches (chosen and rejected are padded to the batch's longest)."""

            def _prepare_dataset(self, dataset, *args, **kwargs):
                if "prompt_ids" in dataset.column_names:
                    return dataset
                return super()._prepare_dataset(dataset, *args, **kwargs)

            def _set_signature_columns_if_needed(self):
                super()._set_signature_columns_if_needed()
                if "length" not in self._signature_columns:
                    self._signature_columns = [*self._signature_columns, "length"]

        identity = f"{tokenizer_fingerprint(tokenizer)}|{template.jinja}|{data_args.max_length}"
        train_rows, stats = encode_pairs(train_pairs, template, data_args.max_length)
        eval_rows, eval_stats = encode_pairs(eval_pairs, template, data_args.max_length)
        for row in train_rows + eval_rows:  # the Trainer groups evaluation batches by length too
            row["length"] = len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))
        args = trl_arguments(DPOConfig, training_args, loss_type=[method], train_sampling_strategy="group_by_length",
                             precompute_ref_log_probs=training_args.precompute_ref_log_probs, **common)
        trainer = PretokenizedDPOTrainer(
            model=model, ref_model=None, args=args, processing_class=tokenizer, peft_config=peft_config,
            train_dataset=cached_dataset(train_rows, "dpo-train", identity, data_args.data_cache_dir),
            eval_dataset=cached_dataset(eval_rows, "dpo-eval", identity, data_args.data_cache_dir) if eval_rows else None,
        )
        return trainer, {"train": stats.to_dict(), "eval": eval_stats.to_dict()}

    (train_rows, stats), (eval_rows, eval_stats) = (render_pairs(pairs, template, data_args.max_length)
                                                    for pairs in (train_pairs, eval_pairs))
    import datasets

    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        # KTO estimates its KL term from neighbouring examples in a fixed order: TRL requires sequential
        # sampling, so the shuffle (seeded) happens here instead.
        args = trl_arguments(KTOConfig, training_args, precompute_ref_log_probs=training_args.precompute_ref_log_probs,
                             train_sampling_strategy="sequential", **common)
        train_rows, eval_rows = unpaired_rows(train_rows), unpaired_rows(eval_rows)
        random.Random(training_args.seed).shuffle(train_rows)
        trainer_class = KTOTrainer
    elif method == "orpo":
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args, trainer_class = trl_arguments(ORPOConfig, training_args, **common), pretokenized(ORPOTrainer)
    else:  # simpo: the CPO family's reference-free loss with a target margin
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = trl_arguments(CPOConfig, training_args, loss_type="simpo", simpo_gamma=training_args.simpo_gamma,
                             cpo_alpha=training_args.cpo_alpha, **common)
        trainer_class = pretokenized(CPOTrainer)
    trainer = trainer_class(
        model=model, args=args, processing_class=tokenizer, peft_config=peft_config,
        train_dataset=datasets.Dataset.from_list(train_rows),
        eval_dataset=datasets.Dataset.from_list(eval_rows) if eval_rows else None,
    )
    return trainer, {"train": stats.to_dict(), "eval": eval_stats.to_dict()}


def run_dpo(model_args: ModelArguments, lora_args: LoraArguments, data_args: PreferenceDataArguments,
            training_args: DPOTrainingArguments) -> dict:
    """Train and save into training_args.output_dir; returns the final evaluation metrics."""
    import os

    from medtune.data.preference import load_pairs
    from medtune.models.loader import (
        load_chat_template,
        lora_config,
    )
    from medtune.stages.common import configure_evaluation, finish_training, load_training_model, start_stage

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    resume, model_path, tokenizer = start_stage(model_args, training_args,
                                                (model_args, lora_args, data_args, training_args))
    template = load_chat_template(model_path, tokenizer, model_args.template)
    train_pairs, eval_pairs, dropped = load_pairs(data_args)
    callbacks = configure_evaluation(training_args, bool(eval_pairs))

    model = load_training_model(model_path, model_args, training_args)
    peft_config = lora_config(lora_args) if lora_args.use_peft else None
    trainer, stats = build_trainer(training_args, data_args, model, tokenizer, template, train_pairs, eval_pairs,
                                   peft_config)
    stats.update({"dropped_identical": dropped, "loss_type": training_args.loss_type, "template": template.name})
    logger.info("preference pairs: %s", stats)
    for callback in callbacks:
        trainer.add_callback(callback)
    train_result = trainer.train(resume_from_checkpoint=resume)
    return finish_training(trainer, train_result, tokenizer, extra={"data_stats.json": stats},
                           chat_template=template)

"""`medtune sft`: supervised fine-tuning on multi-turn medical conversations.

conversations -> ChatTemplate (assistant-only labels) -> packed or length-grouped batches -> Trainer.
"""

from __future__ import annotations

import logging

from medtune.config import LoraArguments, ModelArguments, SFTDataArguments, SFTTrainingArguments

logger = logging.getLogger(__name__)

ARGUMENT_TYPES = (ModelArguments, LoraArguments, SFTDataArguments, SFTTrainingArguments)
DESCRIPTION = ("Supervised fine-tuning on conversations (ShareGPT, OpenAI messages, Alpaca): loss on assistant "
               "replies only, packing without cross-conversation attention, LoRA or full.")


def run_sft(model_args: ModelArguments, lora_args: LoraArguments, data_args: SFTDataArguments,
            training_args: SFTTrainingArguments) -> dict:
    """Train and save into training_args.output_dir; returns the final evaluation metrics."""
    from medtune.data.collators import PackedCollator, PaddingCollator
    from medtune.data.sft import build_sft_split, load_conversations, log_encoding_stats
    from medtune.models.loader import (
        attach_lora,
        load_chat_template,
    )
    from medtune.stages.common import (
        MedtuneTrainer,
        argmax_logits,
        configure_evaluation,
        finish_training,
        load_training_model,
        start_stage,
        token_accuracy,
    )

    resume, model_path, tokenizer = start_stage(model_args, training_args,
                                                (model_args, lora_args, data_args, training_args))
    template = load_chat_template(model_path, tokenizer, model_args.template)

    # Every record is validated and encoded before the model is loaded.
    train_conversations, eval_conversations = load_conversations(data_args)
    with training_args.main_process_first(desc="encoding conversations"):
        train_set, train_stats = build_sft_split(train_conversations, template, data_args)
        eval_set, eval_stats = (build_sft_split(eval_conversations, template, data_args, "eval")
                                if eval_conversations else (None, None))
    log_encoding_stats("train", train_stats)
    if eval_stats:
        log_encoding_stats("eval", eval_stats)
    callbacks = configure_evaluation(training_args, eval_set is not None)
    if not data_args.packing:
        training_args.train_sampling_strategy = "group_by_length"  # similar lengths per batch: less padding

    model = load_training_model(model_path, model_args, training_args)
    if lora_args.use_peft:
        model = attach_lora(model, lora_args)

    collator = PackedCollator(tokenizer.pad_token_id) if data_args.packing else PaddingCollator(tokenizer.pad_token_id)
    trainer = MedtuneTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
        data_collator=collator,
        compute_metrics=token_accuracy if eval_set is not None else None,
        preprocess_logits_for_metrics=argmax_logits if eval_set is not None else None,
        callbacks=callbacks,
    )
    train_result = trainer.train(resume_from_checkpoint=resume)
    stats = {"train": train_stats.to_dict(), **({"eval": eval_stats.to_dict()} if eval_stats else {}),
             "template": template.name, "packing": data_args.packing}
    return finish_training(trainer, train_result, tokenizer, extra={"data_stats.json": stats},
                           chat_template=template)

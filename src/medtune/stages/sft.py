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
    from medtune.data.sft import build_sft_split, load_conversations, log_encoding_stats
    from medtune.models.loader import attach_lora
    from medtune.stages.common import configure_evaluation, finish_training, load_training_model, start_stage
    from medtune.stages.logprobs import causal_lm_trainer

    template = checked_template(model_args, data_args.system_prompt)  # before start_stage writes into output_dir
    tokenizer = template.tokenizer
    resume, model_path, _ = start_stage(model_args, training_args, (model_args, lora_args, data_args, training_args))

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

    with packed_attention(model, data_args):
        collator = sft_collator(tokenizer, data_args, getattr(model.config, "_attn_implementation", None))
        trainer = causal_lm_trainer(model, training_args, train_set, eval_set, tokenizer, collator, callbacks)
        train_result = trainer.train(resume_from_checkpoint=resume)
        stats = {"train": train_stats.to_dict(), **({"eval": eval_stats.to_dict()} if eval_stats else {}),
                 "template": template.name, "packing": data_args.packing}
        return finish_training(trainer, train_result, tokenizer, extra={"data_stats.json": stats},
                               chat_template=template)


def checked_template(model_args, system_prompt: str | None = None):
    """The ChatTemplate for this run, checked against the tokenizer (a `--template` whose special tokens the
    tokenizer lacks is refused) before the stage writes anything."""
    from medtune.models.loader import load_chat_template, load_tokenizer, resolve_model_path

    model_args.model_name_or_path = resolve_model_path(model_args.model_name_or_path)
    tokenizer = load_tokenizer(model_args.tokenizer_name_or_path or model_args.model_name_or_path,
                               model_args.trust_remote_code)
    return load_chat_template(model_args.model_name_or_path, tokenizer, model_args.template, system_prompt)


def sft_collator(tokenizer, data_args, attn_implementation: str | None = None):
    """The collator the Trainer gets: packed rows (joined into one row under flash-attention, which keeps
    conversations apart only that way; stacked otherwise), or padded conversations."""
    from medtune.data.collators import PackedCollator, PaddingCollator, packs_into_one_row

    if data_args.packing:
        return PackedCollator(tokenizer.pad_token_id, one_row=packs_into_one_row(attn_implementation))
    return PaddingCollator(tokenizer.pad_token_id)


def packed_attention(model, data_args):
    """Packed rows are attended per conversation (training and its evaluations) unless --varlen_attention false
    or the model's attention cannot take it (see medtune.models.packed_attention); unpacked batches as they are."""
    import contextlib

    from medtune.models.packed_attention import varlen_attention_for_packing

    if not data_args.packing:
        return contextlib.nullcontext()
    return varlen_attention_for_packing(model, data_args.varlen_attention)

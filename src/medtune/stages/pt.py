"""`medtune pt`: continued pretraining on raw medical text (LoRA by default, or full fine-tuning).

documents -> token blocks (cached) -> causal-LM Trainer with perplexity and token accuracy -> adapter or model.
"""

from __future__ import annotations

import logging

from medtune.config import LoraArguments, ModelArguments, PretrainDataArguments, PretrainTrainingArguments
from medtune.errors import ConfigError

logger = logging.getLogger(__name__)

ARGUMENT_TYPES = (ModelArguments, LoraArguments, PretrainDataArguments, PretrainTrainingArguments)
DESCRIPTION = "Continued pretraining on raw text: tokenize, group into blocks, train (LoRA or full)."


def run_pt(model_args: ModelArguments, lora_args: LoraArguments, data_args: PretrainDataArguments,
           training_args: PretrainTrainingArguments) -> dict:
    """Train and save into training_args.output_dir; returns the final evaluation metrics."""
    from medtune.data.collators import PaddingCollator
    from medtune.data.pretrain import prepare_block_datasets, stream_block_dataset
    from medtune.models.loader import attach_lora, optional_chat_template
    from medtune.stages.common import configure_evaluation, finish_training, load_training_model, start_stage
    from medtune.stages.logprobs import causal_lm_trainer

    if data_args.streaming and training_args.max_steps <= 0:
        raise ConfigError("streaming needs --max_steps (a stream has no length to count epochs by)")
    resume, model_path, tokenizer = start_stage(model_args, training_args,
                                                (model_args, lora_args, data_args, training_args))

    # Validation and tokenization happen before the model is loaded: bad data fails fast and cheap.
    with training_args.main_process_first(desc="tokenizing the corpus"):
        if data_args.streaming:
            train_set, eval_set, stats = stream_block_dataset(data_args, tokenizer), None, {}
            if data_args.validation_file_dir:
                eval_set, _, stats = prepare_block_datasets(_eval_only(data_args), tokenizer)
        else:
            train_set, eval_set, stats = prepare_block_datasets(data_args, tokenizer)
    callbacks = configure_evaluation(training_args, eval_set is not None)
    template = optional_chat_template(model_path, tokenizer, model_args.template)

    model = load_training_model(model_path, model_args, training_args)
    if lora_args.use_peft:
        model = attach_lora(model, lora_args)

    trainer = causal_lm_trainer(model, training_args, train_set, eval_set, tokenizer,
                                PaddingCollator(tokenizer.pad_token_id), callbacks)
    train_result = trainer.train(resume_from_checkpoint=resume)
    return finish_training(trainer, train_result, tokenizer, extra={"data_stats.json": stats},
                           chat_template=template)


def _eval_only(data_args: PretrainDataArguments) -> PretrainDataArguments:
    """Data arguments whose training files are the validation files (to build an eval set next to a stream)."""
    from dataclasses import replace

    return replace(data_args, train_file_dir=data_args.validation_file_dir, validation_file_dir=None,
                   dataset_name=None, validation_split_percentage=0.0, streaming=False)

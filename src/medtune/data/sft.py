"""SFT examples: validated conversations -> (input_ids, labels) through the shared ChatTemplate -> optional packing.

Truncation keeps the start of a conversation up to `model_max_length`; a sample left with no supervised token
is dropped and counted (never trained on silently). Packing uses best-fit-decreasing bins, so almost every
computed position is a real token.
"""

from __future__ import annotations

import bisect
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from medtune.data.cache import build_once, cache_folder, fingerprint, tokenizer_fingerprint
from medtune.data.loading import load_records, require_records, split_records
from medtune.data.records import Conversation
from medtune.paths import bundled_data_dir
from medtune.templates.chat import IGNORE_INDEX, ChatTemplate, TemplateError

logger = logging.getLogger(__name__)

CACHE_VERSION = 2  # 2: whole-conversation tokenization (offsets)


@dataclass
class EncodingStats:
    conversations: int = 0
    truncated: int = 0  # cut to model_max_length, still supervised
    dropped_no_supervised_token: int = 0  # nothing left to learn after truncation
    tokens: int = 0
    supervised_tokens: int = 0
    sequences: int = 0  # rows the model sees (packed rows when packing)
    computed_positions: int = 0  # sum of row lengths before batch padding

    def to_dict(self) -> dict:
        data = asdict(self)
        data["real_token_fraction"] = round(self.tokens / self.computed_positions, 6) if self.computed_positions else 0.0
        return data


def load_conversations(data_args) -> tuple[list[Conversation], list[Conversation]]:
    forced = None if data_args.data_format == "auto" else data_args.data_format
    train, _ = load_records(data_args.train_file_dir or bundled_data_dir("finetune"), "sft", forced)
    if data_args.validation_file_dir:
        evaluation, _ = load_records(data_args.validation_file_dir, "sft", forced)
    else:
        train, evaluation = split_records(train, data_args.validation_split_percentage)
    if data_args.max_train_samples is not None:
        train = train[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        evaluation = evaluation[: data_args.max_eval_samples]
    return train, evaluation


def encode_conversations(conversations: list[Conversation], template: ChatTemplate, max_length: int,
                         train_on_prompt: bool = False) -> tuple[list[dict], EncodingStats]:
    stats = EncodingStats()
    examples = []
    for conversation in conversations:
        stats.conversations += 1
        try:
            encoded = template.encode(conversation.messages, train_on_prompt=train_on_prompt)
        except TemplateError as exc:
            raise TemplateError(f"{conversation.source}: {exc}") from None
        input_ids, labels = encoded.input_ids, encoded.labels
        if len(input_ids) > max_length:
            input_ids, labels = input_ids[:max_length], labels[:max_length]
            # The first label is never a target (nothing predicts it), so it does not count as supervision.
            if all(label == IGNORE_INDEX for label in labels[1:]):
                stats.dropped_no_supervised_token += 1
                logger.debug("%s: no supervised token within %d tokens; dropped", conversation.source, max_length)
                continue
            stats.truncated += 1
        stats.tokens += len(input_ids)
        stats.supervised_tokens += sum(label != IGNORE_INDEX for label in labels[1:])
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples, stats


def best_fit_bins(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item (longest first) goes into the fullest bin that still has room."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining space, bin index), sorted
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            space, bin_index = free.pop(slot)
            bins[bin_index].append(index)
            bisect.insort(free, (space - length, bin_index))
        else:
            bins.append([index])
            bisect.insort(free, (capacity - length, len(bins) - 1))
    return bins


def pack_examples(examples: list[dict], capacity: int) -> list[dict]:
    """Concatenate examples into rows of at most `capacity` tokens with per-conversation position ids."""
    packed = []
    for members in best_fit_bins([len(e["input_ids"]) for e in examples], capacity):
        input_ids, labels, positions = [], [], []
        for index in members:
            example = examples[index]
            input_ids += example["input_ids"]
            # The first token of each conversation is predicted from the previous conversation's last token.
            labels += [IGNORE_INDEX] + example["labels"][1:]
            positions += list(range(len(example["input_ids"])))
        packed.append({"input_ids": input_ids, "labels": labels, "position_ids": positions})
    return packed


def build_sft_split(conversations: list[Conversation], template: ChatTemplate, data_args, name: str = "train"):
    """A `datasets.Dataset` of (packed) examples and its statistics, encoded once and cached: a re-run, a resume
    or another torchrun rank loads it instead of rendering every conversation again."""
    import datasets

    key = fingerprint(f"v{CACHE_VERSION}", json.dumps([c.messages for c in conversations], ensure_ascii=False),
                      tokenizer_fingerprint(template.tokenizer), template.jinja, "|".join(template.stop_strings),
                      str(data_args.model_max_length), str(data_args.train_on_prompt), str(data_args.packing))

    def build(scratch: Path) -> None:
        examples, stats = encode_conversations(conversations, template, data_args.model_max_length,
                                               data_args.train_on_prompt)
        require_records(examples, conversations, f"all {stats.conversations} {name} conversations dropped: no assistant "
                        f"reply starts within model_max_length ({data_args.model_max_length}); raise --model_max_length")
        if data_args.packing:
            examples = pack_examples(examples, data_args.model_max_length)
        stats.sequences = len(examples)
        stats.computed_positions = sum(len(e["input_ids"]) for e in examples)
        datasets.Dataset.from_list(examples).save_to_disk(str(scratch / "data"))
        (scratch / "stats.json").write_text(json.dumps(asdict(stats)))

    folder = build_once(cache_folder(f"sft-{name}", key, data_args.data_cache_dir), build,
                        rebuild=data_args.overwrite_cache)
    stats = EncodingStats(**json.loads((folder / "stats.json").read_text()))
    return datasets.load_from_disk(str(folder / "data")), stats


def log_encoding_stats(name: str, stats: EncodingStats) -> None:
    logger.info(
        "%s: %d conversations -> %d sequences; %d tokens, %d supervised; %d truncated, %d dropped with no supervised "
        "token left", name, stats.conversations, stats.sequences, stats.tokens, stats.supervised_tokens,
        stats.truncated, stats.dropped_no_supervised_token,
    )
    if stats.dropped_no_supervised_token:
        logger.warning("%s: %d conversations dropped: longer than model_max_length before any reply",
                       name, stats.dropped_no_supervised_token)

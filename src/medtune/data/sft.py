"""SFT examples: validated conversations -> (input_ids, labels) through the shared ChatTemplate -> optional packing.

Truncation keeps the start of a conversation up to `model_max_length`; a sample left with no supervised token
is dropped and counted (never trained on silently). Before that, MedicalGPT's per-turn limits apply when given:
the tokens before each reply keep at most `max_source_length` (their end, plus the template's leading tokens and
the user turn's role header) and each reply at most `max_target_length` (its start and its stop token). Packing uses best-fit-decreasing bins, so almost every
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

CACHE_VERSION = 3  # 2: whole-conversation tokenization (offsets); 3: per-turn cuts keep role headers and stops


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


def label_runs(labels: list[int]) -> list[tuple[int, int, bool]]:
    """(start, end, is_reply) of each maximal run of prompt tokens (label -100) and of reply tokens."""
    runs: list[tuple[int, int, bool]] = []
    for index, label in enumerate(labels):
        is_reply = label != IGNORE_INDEX
        if runs and runs[-1][2] == is_reply:
            runs[-1] = (runs[-1][0], index + 1, is_reply)
        else:
            runs.append((index, index + 1, is_reply))
    return runs


def cut_turns(input_ids: list[int], labels: list[int], kept: set[int], stop_ids: set[int], max_source: int | None,
              max_target: int | None) -> tuple[list[int], list[int], bool]:
    """MedicalGPT's per-turn limits on (ids, assistant-only labels): every run of prompt tokens (a turn's source:
    the user turn with the template's tags, the system prompt too before the first reply) keeps its last
    `max_source` tokens, so the question and the generation prompt right before the reply stay, and always its
    positions in `kept` (the template's leading tokens such as [gMASK]<sop>, the user turn's role header); every
    reply keeps its first tokens and always its stop tokens (e.g. <|im_end|>, GLM-4's next <|user|>), labelled as
    uncut, within `max_target`, so a cut turn still ends where the next one visibly begins.
    Returns the cut ids and labels and whether anything was cut."""
    positions: list[int] = []
    for start, end, is_reply in label_runs(labels):
        run = range(start, end)
        limit = max_target if is_reply else max_source
        if limit is None or len(run) <= limit:
            positions += run
        elif is_reply:
            positions += reply_start_and_stop(run, input_ids, stop_ids, limit)
        else:
            positions += source_frame_and_end(run, kept, limit)
    return [input_ids[p] for p in positions], [labels[p] for p in positions], len(positions) < len(input_ids)


def reply_start_and_stop(run: range, input_ids: list[int], stop_ids: set[int], limit: int) -> list[int]:
    """The positions of a reply cut to `limit` tokens: its start and its tail from its last stop token on (the
    whole tail even when that alone exceeds the limit)."""
    tail = next((p for p in reversed(run) if input_ids[p] in stop_ids), run.stop)
    return [*range(run.start, min(tail, run.start + max(limit - (run.stop - tail), 0))), *range(tail, run.stop)]


def source_frame_and_end(run: range, kept: set[int], limit: int) -> list[int]:
    """The positions of a source cut to `limit` tokens: its `kept` ones (all of them, even beyond the limit) and
    as many of its last others as fit."""
    frame = [p for p in run if p in kept]
    others = [p for p in run if p not in kept]
    room = max(limit - len(frame), 0)
    return sorted(frame + others[len(others) - room:])


def encode_conversations(conversations: list[Conversation], template: ChatTemplate, max_length: int,
                         train_on_prompt: bool = False, max_source: int | None = None,
                         max_target: int | None = None) -> tuple[list[dict], EncodingStats]:
    stats = EncodingStats()
    examples = []
    per_turn = max_source is not None or max_target is not None
    head = template.head_ids if per_turn else []
    stop_ids = set(template.stop_token_ids)
    for conversation in conversations:
        stats.conversations += 1
        try:
            # per-turn limits find the turns by the assistant-only labels; train_on_prompt relabels afterwards
            encoded = template.encode(conversation.messages, train_on_prompt=train_on_prompt and not per_turn,
                                      mark_user_headers=per_turn)
        except TemplateError as exc:
            raise TemplateError(f"{conversation.source}: {exc}") from None
        input_ids, labels = encoded.input_ids, encoded.labels
        cut = False
        if per_turn:
            kept = set(encoded.user_header_positions)
            kept.update(range(len(head)) if input_ids[:len(head)] == head else ())
            input_ids, labels, cut = cut_turns(input_ids, labels, kept, stop_ids, max_source, max_target)
            labels = list(input_ids) if train_on_prompt else labels
        if len(input_ids) > max_length:
            input_ids, labels, cut = input_ids[:max_length], labels[:max_length], True
        if cut:
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

    turn_limits = (data_args.max_source_length, data_args.max_target_length)
    key = fingerprint(f"v{CACHE_VERSION}", json.dumps([c.messages for c in conversations], ensure_ascii=False),
                      tokenizer_fingerprint(template.tokenizer), *template.cache_parts,
                      str(data_args.model_max_length), str(data_args.train_on_prompt), str(data_args.packing),
                      *([f"turn limits {turn_limits}"] if turn_limits != (None, None) else []))

    def build(scratch: Path) -> None:
        examples, stats = encode_conversations(conversations, template, data_args.model_max_length,
                                               data_args.train_on_prompt, *turn_limits)
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

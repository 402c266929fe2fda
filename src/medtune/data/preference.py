"""Preference pairs: validated records -> rendered through the shared ChatTemplate -> token ids that fit
`max_length` by a stated rule (never dropped for length), or rendered strings for TRL's string-based trainers.

Pairs whose chosen and rejected answers are identical carry no preference and are dropped with a count.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass

from medtune.data.cache import build_once, cache_folder, fingerprint
from medtune.data.loading import load_records, split_records
from medtune.data.records import PreferencePair
from medtune.paths import bundled_data_dir
from medtune.templates.chat import ChatTemplate

logger = logging.getLogger(__name__)

CACHE_VERSION = 1


@dataclass
class PairStats:
    pairs: int = 0
    dropped_identical: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def load_pairs(data_args) -> tuple[list[PreferencePair], list[PreferencePair], int]:
    """(train pairs, eval pairs, number dropped because chosen == rejected)."""
    forced = None if data_args.data_format == "auto" else data_args.data_format
    pairs, _ = load_records(data_args.train_file_dir or bundled_data_dir("reward"), "preference", forced)
    evaluation = []
    if data_args.validation_file_dir:
        evaluation, _ = load_records(data_args.validation_file_dir, "preference", forced)
    kept = [p for p in pairs if p.chosen.strip() != p.rejected.strip()]
    evaluation = [p for p in evaluation if p.chosen.strip() != p.rejected.strip()]
    dropped = len(pairs) - len(kept)
    if dropped:
        logger.warning("dropped %d pairs whose chosen and rejected answers are identical", dropped)
    if not data_args.validation_file_dir:
        kept, evaluation = split_records(kept, data_args.validation_split_percentage)
    if data_args.max_train_samples is not None:
        kept = kept[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        evaluation = evaluation[: data_args.max_eval_samples]
    return kept, evaluation, dropped


def fit_to_length(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  head: list[int] | None = None) -> tuple[list[int], list[int], list[int], bool]:
    """Make prompt + each answer fit `max_length` tokens.

    The prompt keeps its end (the question being answered) -- and its `head`, the template's leading tokens such
    as [gMASK]<sop>, which every prompt starts with -- with at least half the budget when the answers would need
    more; both answers are then cut at the end to what remains.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected, False
    prompt_budget = max(max_length - longest, max_length // 2)
    head = head if head and prompt[: len(head)] == head else []
    prompt = head + prompt[len(head):][-(prompt_budget - len(head)):]
    budget = max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget], True


def encode_pairs(pairs: list[PreferencePair], template: ChatTemplate, max_length: int) -> tuple[list[dict], PairStats]:
    """Rows of prompt_ids / chosen_ids / rejected_ids (the columns TRL's DPO collator reads)."""
    stats = PairStats()
    rows = []
    head = template.head_ids
    for pair in pairs:
        prompt, chosen = template.encode_reply(pair.prompt, pair.chosen)
        prompt_again, rejected = template.encode_reply(pair.prompt, pair.rejected)
        assert prompt == prompt_again  # the prompt renders the same whatever the answer
        prompt, chosen, rejected, truncated = fit_to_length(prompt, chosen, rejected, max_length, head)
        stats.pairs += 1
        stats.truncated += truncated
        stats.prompt_tokens += len(prompt)
        stats.completion_tokens += len(chosen) + len(rejected)
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows, stats


def render_pairs(pairs: list[PreferencePair], template: ChatTemplate, max_length: int) -> tuple[list[dict], PairStats]:
    """Pairs fitted to `max_length` by the same token rule as DPO, as ids (prompt_ids, chosen_ids, rejected_ids)
    and as the text those ids decode to (prompt, chosen, rejected), for trainers that want text (KTO) or that
    medtune feeds ids through their own row hook (ORPO, SimPO)."""
    rows, stats = encode_pairs(pairs, template, max_length)
    decode = template.tokenizer.decode
    for row in rows:
        row.update(prompt=decode(row["prompt_ids"]), chosen=decode(row["chosen_ids"]),
                   rejected=decode(row["rejected_ids"]))
    return rows, stats


def pretokenized(trainer_class):
    """A CPO-family trainer (ORPO, SimPO) whose rows are built from medtune's ids instead of re-tokenized text, so
    no EOS is appended after the template's own stop marker or onto a truncated reply."""

    class Pretokenized(trainer_class):
        def tokenize_row(self, feature, model=None):
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = list(feature[f"{side}_ids"])
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [-100] * len(prompt) + answer
            return row

    Pretokenized.__name__ = f"Pretokenized{trainer_class.__name__}"
    return Pretokenized


def unpaired_rows(rows: list[dict]) -> list[dict]:
    """KTO learns from single answers marked desirable or not: each pair gives one of each."""
    out = []
    for row in rows:  # KTO's trainer has no hook for ids: it gets the fitted text
        out.append({"prompt": row["prompt"], "completion": row["chosen"], "label": True})
        out.append({"prompt": row["prompt"], "completion": row["rejected"], "label": False})
    return out


def cached_dataset(rows: list[dict], name: str, identity: str, data_cache_dir: str | None):
    """Rows saved under a content-addressed folder and loaded back memory-mapped.

    A dataset on disk has a stable fingerprint and a cache folder, which is where TRL keeps precomputed
    reference log-probs: a re-run, or another loss type on the same model and data, finds them there.
    """
    import datasets

    key = fingerprint(f"v{CACHE_VERSION}", identity, json.dumps(rows, ensure_ascii=False, sort_keys=True))
    folder = build_once(cache_folder(name, key, data_cache_dir),
                        lambda scratch: datasets.Dataset.from_list(rows).save_to_disk(str(scratch)))
    return datasets.load_from_disk(str(folder))

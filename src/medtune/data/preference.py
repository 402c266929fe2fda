"""Preference pairs: validated records -> rendered through the shared ChatTemplate -> token ids that fit
`max_length` by a stated rule (never dropped for length) -> a dataset cached once for every method.

Every method trains on the template's own ids: DPO, ORPO and SimPO on (prompt, chosen, rejected) rows, KTO on
(prompt, completion, label) rows, one of each per pair. None of TRL's text paths runs, so no EOS is appended after
the template's own stop marker or onto a truncated reply.

Pairs whose chosen and rejected answers are identical carry no preference and are dropped with a count.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from medtune.data.cache import build_once, cache_folder, fingerprint, tokenizer_fingerprint
from medtune.data.loading import load_records, split_records
from medtune.data.records import PreferencePair
from medtune.errors import DataError, Problem
from medtune.paths import bundled_data_dir
from medtune.templates.chat import ChatTemplate

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
PAIRED, UNPAIRED = "pairs", "unpaired"  # row shapes: DPO/ORPO/SimPO, and KTO


@dataclass
class PairStats:
    pairs: int = 0
    dropped_identical: int = 0
    truncated: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _usable_pairs(location, data_format: str | None) -> tuple[list[PreferencePair], int]:
    """The pairs under `location` that express a preference, and how many did not (chosen == rejected).

    No usable pair at all (an empty or whitespace-only file, or nothing but identical answers) is refused here, with
    the files and the counts, rather than failing later inside the trainer."""
    pairs, reports = load_records(location, "preference", data_format)
    kept = [p for p in pairs if p.chosen.strip() != p.rejected.strip()]
    dropped = len(pairs) - len(kept)
    if not kept:
        files = ", ".join(r.path for r in reports) or str(location)
        raise DataError([Problem(files, None, None, f"no usable preference pairs: {len(pairs)} read, {dropped} "
                                                    "dropped because chosen and rejected are identical")])
    if dropped:
        logger.warning("%s: dropped %d pairs whose chosen and rejected answers are identical", location, dropped)
    return kept, dropped


def load_pairs(data_args) -> tuple[list[PreferencePair], list[PreferencePair], int]:
    """(train pairs, eval pairs, number dropped because chosen == rejected)."""
    forced = None if data_args.data_format == "auto" else data_args.data_format
    kept, dropped = _usable_pairs(data_args.train_file_dir or bundled_data_dir("reward"), forced)
    if data_args.validation_file_dir:
        evaluation, eval_dropped = _usable_pairs(data_args.validation_file_dir, forced)
        dropped += eval_dropped
    else:
        kept, evaluation = split_records(kept, data_args.validation_split_percentage)
    if data_args.max_train_samples is not None:
        kept = kept[: data_args.max_train_samples]
    if data_args.max_eval_samples is not None:
        evaluation = evaluation[: data_args.max_eval_samples]
    return kept, evaluation, dropped


def cut_prompt(prompt: list[int], budget: int, head: list[int], keep: str) -> list[int]:
    """`budget` tokens of the prompt: its beginning (`keep_start`) or its `head` plus its end (`keep_end`)."""
    if keep == "keep_start":
        return prompt[:budget]
    return head + prompt[len(head):][len(prompt) - budget:]


def fit_to_length(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
                  head: list[int] | None = None, keep: str = "keep_end", max_prompt: int | None = None,
                  max_answer: int | None = None) -> tuple[list[int], list[int], list[int], bool]:
    """Make prompt + each answer fit `max_length` tokens.

    `max_prompt` / `max_answer` (MedicalGPT's max_source_length / max_target_length) first cap the prompt and each
    answer on their own. Then, if still too long, the prompt keeps its end (`keep_end`: the question being answered)
    or its beginning (`keep_start`), and always its `head`, the template's leading tokens such as [gMASK]<sop> that
    every prompt starts with; it keeps at least half the budget when the answers would need more. Both answers are
    then cut at the end to what remains.
    """
    head = head if head and prompt[: len(head)] == head else []
    truncated = False
    if max_prompt is not None and len(prompt) > max_prompt:
        prompt, truncated = cut_prompt(prompt, max(max_prompt, len(head)), head, keep), True
    if max_answer is not None and max(len(chosen), len(rejected)) > max_answer:
        chosen, rejected, truncated = chosen[:max_answer], rejected[:max_answer], True
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected, truncated
    prompt_budget = min(len(prompt), max(max_length - longest, max_length // 2))
    prompt = cut_prompt(prompt, prompt_budget, head, keep)
    budget = max_length - len(prompt)
    return prompt, chosen[:budget], rejected[:budget], True


def encode_pairs(pairs: list[PreferencePair], template: ChatTemplate, max_length: int,
                 truncation_mode: str = "keep_end", max_prompt: int | None = None,
                 max_answer: int | None = None) -> tuple[list[dict], PairStats]:
    """Rows of prompt_ids / chosen_ids / rejected_ids (the columns TRL's DPO collator reads)."""
    stats = PairStats()
    rows = []
    head = template.head_ids
    for pair in pairs:
        prompt, chosen = template.encode_reply(pair.prompt, pair.chosen)
        prompt_again, rejected = template.encode_reply(pair.prompt, pair.rejected)
        assert prompt == prompt_again  # the prompt renders the same whatever the answer
        prompt, chosen, rejected, truncated = fit_to_length(prompt, chosen, rejected, max_length, head,
                                                            truncation_mode, max_prompt, max_answer)
        stats.pairs += 1
        stats.truncated += truncated
        stats.prompt_tokens += len(prompt)
        stats.completion_tokens += len(chosen) + len(rejected)
        rows.append({"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected})
    return rows, stats


def paired_rows(rows: list[dict]) -> list[dict]:
    """DPO/ORPO/SimPO rows, with a `length` column for length-grouped batches (chosen and rejected are padded to
    the batch's longest)."""
    return [dict(row, length=len(row["prompt_ids"]) + max(len(row["chosen_ids"]), len(row["rejected_ids"])))
            for row in rows]


def unpaired_rows(rows: list[dict], seed: int) -> list[dict]:
    """KTO learns from single answers marked desirable or not: each pair gives one of each.

    KTO estimates its KL term from neighbouring examples in a fixed order (TRL requires sequential sampling), so
    the rows are shuffled here, by the run's seed."""
    out = []
    for row in rows:
        out.append({"prompt_ids": row["prompt_ids"], "completion_ids": row["chosen_ids"], "label": True})
        out.append({"prompt_ids": row["prompt_ids"], "completion_ids": row["rejected_ids"], "label": False})
    random.Random(seed).shuffle(out)
    return out


def build_preference_split(pairs: list[PreferencePair], template: ChatTemplate, data_args, training_args,
                           name: str = "train"):
    """A `datasets.Dataset` of the rows `training_args.loss_type` trains on, and its statistics.

    Tokenize once: the cache key is computed from the pairs' text and every setting that changes the ids, before
    anything is encoded, so a re-run, a resume or another torchrun rank loads the rows instead of rendering every
    pair again. The folder is also where TRL keeps precomputed reference log-probs: changed pairs get a new folder,
    so stale log-probs are never reused, while a re-run or another loss type on the same data finds them there.
    """
    import datasets

    shape = UNPAIRED if training_args.loss_type == "kto" else PAIRED
    key = fingerprint(f"v{CACHE_VERSION}", shape, str(training_args.seed if shape == UNPAIRED else ""),
                      json.dumps([(p.prompt, p.chosen, p.rejected) for p in pairs], ensure_ascii=False),
                      tokenizer_fingerprint(template.tokenizer), *template.cache_parts,
                      str(data_args.max_length), training_args.truncation_mode,
                      f"{data_args.max_source_length}/{data_args.max_target_length}")

    def build(scratch: Path) -> None:
        rows, stats = encode_pairs(pairs, template, data_args.max_length, training_args.truncation_mode,
                                   data_args.max_source_length, data_args.max_target_length)
        rows = unpaired_rows(rows, training_args.seed) if shape == UNPAIRED else paired_rows(rows)
        datasets.Dataset.from_list(rows).save_to_disk(str(scratch / "data"))
        (scratch / "stats.json").write_text(json.dumps(stats.to_dict()))

    folder = build_once(cache_folder(f"preference-{shape}-{name}", key, data_args.data_cache_dir), build,
                        rebuild=data_args.overwrite_cache)
    stats = PairStats(**json.loads((folder / "stats.json").read_text()))
    return datasets.load_from_disk(str(folder / "data")), stats


# -- TRL trainers fed medtune's ids -----------------------------------------------------------------------------

def ids_fed_dpo(trainer_class):
    """DPOTrainer taking prompt_ids/chosen_ids/rejected_ids as they are, and keeping the `length` column."""

    class IdsFedDPOTrainer(trainer_class):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            if "prompt_ids" in dataset.column_names:
                return dataset
            return super()._prepare_dataset(dataset, *args, **kwargs)

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            if "length" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "length"]

    return IdsFedDPOTrainer


def ids_fed_kto(trainer_class):
    """KTOTrainer taking prompt_ids/completion_ids as they are (its own path re-tokenizes text and appends EOS)."""

    class IdsFedKTOTrainer(trainer_class):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            if "completion_ids" not in dataset.column_names:
                return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            if not self.calculate_KL:
                return dataset

            def mismatched_completions(batch):
                # KL pairs: each prompt with its batch neighbour's completion, as TRL's own preparation builds them.
                completions = batch["completion_ids"]
                return {"KL_completion_ids": completions[-1:] + completions[:-1]}

            return dataset.map(mismatched_completions, batched=True, batch_size=args.per_device_train_batch_size,
                               desc=f"KL completions for {dataset_name}")

    return IdsFedKTOTrainer


def ids_fed_cpo_family(trainer_class):
    """A CPO-family trainer (ORPO, SimPO) whose rows are built from medtune's ids instead of re-tokenized text."""

    class IdsFedTrainer(trainer_class):
        def tokenize_row(self, feature, model=None):
            prompt = list(feature["prompt_ids"])
            row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
            for side in ("chosen", "rejected"):
                answer = list(feature[f"{side}_ids"])
                row[f"{side}_input_ids"] = prompt + answer
                row[f"{side}_attention_mask"] = [1] * (len(prompt) + len(answer))
                row[f"{side}_labels"] = [-100] * len(prompt) + answer
            return row

    IdsFedTrainer.__name__ = f"IdsFed{trainer_class.__name__}"
    return IdsFedTrainer

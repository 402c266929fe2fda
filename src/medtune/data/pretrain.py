"""Continued-pretraining datasets: validated documents -> cached train/eval blocks (or a stream of blocks).

Tokenize once: the grouped blocks are saved under a cache key made of the documents, the tokenizer, the block
size and the remainder rule, so a re-run or a resume loads them instead of tokenizing again. Under torchrun the
caller wraps this in `main_process_first`, so rank 0 builds the cache while the other ranks wait, then read it.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from medtune.data.blocks import BlockStats, iter_blocks, tokenize_texts
from medtune.data.cache import build_once, cache_folder, fingerprint, tokenizer_fingerprint
from medtune.data.loading import (
    KIND_SUFFIXES,
    FileReport,
    file_problems,
    iter_file_records,
    load_records,
    require_records,
    split_records,
)
from medtune.data.readers import list_data_files, raise_if_problems
from medtune.data.records import TextDocument
from medtune.errors import DataError, Problem
from medtune.paths import bundled_data_dir

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
FEATURES = ("input_ids", "attention_mask", "labels")


def load_documents(data_args) -> tuple[list[TextDocument], list[TextDocument]]:
    """Training and evaluation documents, every record validated (DataError lists all problems)."""
    if data_args.dataset_name:
        train = _documents_from_datasets(data_args.dataset_name, data_args.dataset_config_name)
    else:
        train, _ = load_records(data_args.train_file_dir or bundled_data_dir("pretrain"), "text")
    if data_args.validation_file_dir:
        evaluation, _ = load_records(data_args.validation_file_dir, "text")
    else:
        train, evaluation = split_records(train, data_args.validation_split_percentage)
    return train, evaluation


def validate_documents(data_args) -> None:
    """Read and validate every document `medtune pt` would read (DataError lists all problems), without keeping
    a streamed corpus in memory; lets a caller check the data before it replaces earlier results."""
    if data_args.streaming:
        validate_stream_sources(data_args.train_file_dir or bundled_data_dir("pretrain"))
        if data_args.validation_file_dir:
            validate_stream_sources(data_args.validation_file_dir)
    else:
        load_documents(data_args)


def _documents_from_datasets(name: str, config_name: str | None) -> list[TextDocument]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, config_name, split="train")
    except Exception as exc:  # datasets raises many types (network, missing files, bad config)
        raise DataError([Problem(name, None, None, f"cannot load dataset ({str(exc).splitlines()[0]})")]) from None
    if "text" not in dataset.column_names:
        raise DataError([Problem(name, None, "text", f"missing column (columns: {', '.join(dataset.column_names)})")])
    documents, problems = [], []
    for row, text in enumerate(dataset["text"]):
        if not isinstance(text, str) or not text.strip():
            problems.append(Problem(name, row + 1, "text", "empty" if isinstance(text, str) else "not a string"))
        else:
            documents.append(TextDocument(text, f"{name}[row {row + 1}]"))
    if not documents and not problems:
        problems.append(Problem(name, None, None, "no rows in its train split"))
    raise_if_problems(problems)
    return documents


def cache_key(train: list[TextDocument], evaluation: list[TextDocument], tokenizer, data_args) -> str:
    texts = "\1".join("\0".join(d.text for d in split) for split in (train, evaluation))
    return fingerprint(f"v{CACHE_VERSION}", texts, str(data_args.block_size), data_args.remainder,
                       tokenizer_fingerprint(tokenizer))


def _build_split(documents: list[TextDocument], tokenizer, data_args, scratch: Path, name: str):
    import datasets

    stats = BlockStats()

    def generate():
        texts = (d.text for d in documents)
        yield from iter_blocks(tokenize_texts(texts, tokenizer), data_args.block_size, data_args.remainder,
                               tokenizer.pad_token_id, stats)

    features = datasets.Features({k: datasets.Sequence(datasets.Value("int32")) for k in FEATURES})
    dataset = datasets.Dataset.from_generator(generate, features=features, cache_dir=str(scratch / name),
                                              fingerprint=f"{name}-{scratch.name}")
    return dataset, stats


def _build_blocks(scratch: Path, train_docs, eval_docs, tokenizer, data_args) -> None:
    stats = {}
    for name, documents in (("train", train_docs), ("eval", eval_docs)):
        if not documents:
            continue
        logger.info("tokenizing %d %s documents into blocks of %d tokens", len(documents), name, data_args.block_size)
        dataset, split_stats = _build_split(documents, tokenizer, data_args, scratch, name)
        dataset.save_to_disk(str(scratch / f"{name}_blocks"))
        stats[name] = split_stats.to_dict()
    (scratch / "stats.json").write_text(json.dumps(stats, indent=2))
    for name in ("train", "eval"):
        shutil.rmtree(scratch / name, ignore_errors=True)  # the generator's own scratch cache


def require_one_block(documents: list[TextDocument], tokenizer, data_args) -> None:
    """With `--remainder drop` a corpus shorter than one block yields nothing to train on: say so up front.

    Tokenizing stops as soon as one block's worth is seen, so a normal corpus costs a few documents here.
    """
    if data_args.remainder != "drop" or not documents:
        return
    tokens = 0
    for ids in tokenize_texts((d.text for d in documents), tokenizer, batch_size=64):
        tokens += len(ids)
        if tokens >= data_args.block_size:
            return
    require_records([], documents, f"{len(documents)} documents hold {tokens} tokens, fewer than one block of "
                                   f"{data_args.block_size}, and --remainder drop discards the partial block; use "
                                   "--remainder pad or a smaller --block_size")


def prepare_block_datasets(data_args, tokenizer) -> tuple[object, object | None, dict]:
    """(train blocks, eval blocks or None, statistics), from the cache when possible."""
    import datasets

    train_docs, eval_docs = load_documents(data_args)
    for documents in (train_docs, eval_docs):
        require_one_block(documents, tokenizer, data_args)
    entry = build_once(cache_folder("pt", cache_key(train_docs, eval_docs, tokenizer, data_args),
                                    data_args.data_cache_dir),
                       lambda scratch: _build_blocks(scratch, train_docs, eval_docs, tokenizer, data_args),
                       rebuild=data_args.overwrite_cache)
    stats = json.loads((entry / "stats.json").read_text())
    train = datasets.load_from_disk(str(entry / "train_blocks"))
    evaluation = datasets.load_from_disk(str(entry / "eval_blocks")) if "eval" in stats else None
    if data_args.max_train_samples is not None:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if evaluation is not None and data_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))
    _log_stats(stats)
    return train, evaluation, stats


def _log_stats(stats: dict) -> None:
    for name, split in stats.items():
        logger.info(
            "%s: %d documents, %d tokens -> %d blocks; final partial block: %d padding tokens added, %d tokens "
            "dropped; real-token fraction %.4f", name, split["documents"], split["tokens"], split["blocks"],
            split["padded_tokens"], split["dropped_tokens"], split["real_token_fraction"],
        )


def validate_stream_sources(location: str | Path) -> list[Path]:
    """A streaming run still checks every record before training (streamed too: one record in memory at a time)."""
    files = list_data_files(location, KIND_SUFFIXES["text"])
    raise_if_problems([problem for path in files for problem in file_problems(path, "text")])
    return files


def stream_block_dataset(data_args, tokenizer):
    """An IterableDataset of blocks read lazily from the training files (for corpora larger than memory)."""
    import datasets

    files = validate_stream_sources(data_args.train_file_dir or bundled_data_dir("pretrain"))

    def texts() -> Iterator[str]:
        for path in files:  # already validated above: no problem is left to report
            yield from (entry.record.text for entry in iter_file_records(path, FileReport(str(path), "unknown"),
                                                                         "text"))

    def generate():
        yield from iter_blocks(tokenize_texts(texts(), tokenizer), data_args.block_size, data_args.remainder,
                               tokenizer.pad_token_id)

    return datasets.IterableDataset.from_generator(generate)

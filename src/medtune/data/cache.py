"""Tokenize once: content-addressed cache folders shared by every stage.

A folder is built in a scratch sibling and renamed into place, under a file lock, so concurrent runs and torchrun
ranks never see half-written data, and only one of them does the work while the others wait and then read it
(the fix for rank-0-tokenizes-while-NCCL-times-out).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from medtune.paths import cache_dir

logger = logging.getLogger(__name__)


def fingerprint(*parts: str | bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def tokenizer_fingerprint(tokenizer) -> str:
    """Changes whenever the tokenizer would produce different ids (vocabulary, merges, special tokens)."""
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return fingerprint(payload, str(tokenizer.eos_token_id), str(tokenizer.pad_token_id))


def cache_folder(name: str, key: str, root: str | None = None) -> Path:
    return Path(root or cache_dir("tokenized")) / f"{name}-{key}"


def build_once(folder: Path, build: Callable[[Path], None], rebuild: bool = False) -> Path:
    """Run `build(scratch)` unless `folder` already exists (or `rebuild`), then move the result into place."""
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if folder.is_dir() and not rebuild:
            logger.info("loading tokenized data from cache %s", folder)
            return folder
        scratch = folder.with_name(folder.name + ".building")
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        build(scratch)
        shutil.rmtree(folder, ignore_errors=True)
        scratch.rename(folder)
    return folder

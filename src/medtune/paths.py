"""Where medtune finds its bundled data and configs, and where it caches what it builds.

The bundled data and configs live at the repository root (an editable install keeps them beside the package);
`MEDTUNE_HOME` points elsewhere for a non-editable install, `MEDTUNE_CACHE_DIR` moves the cache.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    override = os.environ.get("MEDTUNE_HOME")
    return Path(override) if override else Path(__file__).resolve().parents[2]


def bundled_data_dir(kind: str = "") -> Path:
    """`kind` is one of pretrain, finetune, reward, eval (empty for the data root)."""
    return project_root() / "data" / kind if kind else project_root() / "data"


def bundled_config(name: str) -> Path:
    return project_root() / "configs" / name


def cache_dir(kind: str) -> Path:
    root = Path(os.environ.get("MEDTUNE_CACHE_DIR", Path.home() / ".cache" / "medtune"))
    return root / kind

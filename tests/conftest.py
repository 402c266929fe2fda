"""Shared fixtures: an isolated cache, and tiny models built once per test session (offline, seconds each)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Keep tokenized-data and default-model caches out of the user's home (subprocesses inherit this)."""
    cache = tmp_path_factory.mktemp("medtune-cache")
    previous = os.environ.get("MEDTUNE_CACHE_DIR")
    os.environ["MEDTUNE_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("MEDTUNE_CACHE_DIR", None)
    else:
        os.environ["MEDTUNE_CACHE_DIR"] = previous


_built: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """`tiny_model("glm4")` -> folder of that embedded tiny model, built once per session."""
    from medtune.models.tiny import build_tiny_model

    def get(arch: str = "glm4") -> Path:
        if arch not in _built:
            _built[arch] = build_tiny_model(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return _built[arch]

    return get


@pytest.fixture(scope="session")
def glm4_dir(tiny_model) -> Path:
    return tiny_model("glm4")


def run_medtune(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the CLI as a user would (a separate process), capturing output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "medtune", *args], cwd=cwd or REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)

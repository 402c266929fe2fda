"""Shared fixtures: an isolated cache, and tiny models built once per test session (offline, seconds each)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under pytest-xdist each worker (and every CLI subprocess it starts) gets one thread: two workers with
    # torch's default of one thread per core would oversubscribe the cores and run slower than one worker.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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


@pytest.fixture(scope="session")
def browser():
    """Headless Debian `chromium` driven by Selenium through the system `chromedriver` (nothing downloaded).

    Without them the browser tests skip, unless MEDTUNE_REQUIRE_BROWSER=1 (CI sets it) turns that into a failure.
    """
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    missing = [name for name, found in (("chromium", binary), ("chromedriver", driver_path)) if not found]
    try:
        from selenium import webdriver
    except ImportError:
        missing.append("selenium (pip install -e '.[dev]')")
    if missing:
        message = f"browser tests need {', '.join(missing)} (Debian: apt-get install chromium chromium-driver)"
        if os.environ.get("MEDTUNE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,1600"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console messages, for error checks
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    yield driver
    driver.quit()


def send_json(handler, status: int, body: dict) -> None:
    """Answer from a test's http.server handler with a JSON body, as an OpenAI-compatible server does."""
    data = json.dumps(body, ensure_ascii=False).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)

"""Packages that only some users install (the extras in pyproject.toml): an option that needs one that is missing
stops with one line naming what to install, instead of an ImportError or PackageNotFoundError traceback from deep
inside transformers."""

from __future__ import annotations

import importlib.util

from medtune.errors import ConfigError

# import name -> (distribution name on PyPI, the medtune extra that installs it)
OPTIONAL_PACKAGES = {
    "deepspeed": ("deepspeed", "gpu"),
    "flash_attn": ("flash-attn", "gpu"),
    "bitsandbytes": ("bitsandbytes", "gpu"),
    "liger_kernel": ("liger-kernel", "gpu"),
    "vllm": ("vllm", "vllm"),
}


def is_installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def install_hint(module: str) -> str:
    distribution, extra = OPTIONAL_PACKAGES[module]
    return f"pip install 'medtune[{extra}]' or pip install {distribution}"


def require_package(module: str, option: str) -> None:
    """Raise a one-line ConfigError when `option` needs `module` and it is not installed."""
    if not is_installed(module):
        raise ConfigError(f"{option} needs the {OPTIONAL_PACKAGES[module][0]} package, which is not installed: "
                          f"{install_hint(module)}")


def require_vllm() -> None:
    """`--backend vllm` (serve, predict): the vllm package and a CUDA GPU, else one line naming what is missing."""
    if not is_installed("vllm"):
        missing = f"the vllm package, which is not installed ({install_hint('vllm')})"
    else:
        import torch

        missing = None if torch.cuda.is_available() else "a CUDA GPU, and none is visible"
    if missing:
        raise ConfigError(f"--backend vllm needs {missing}; use --backend hf (transformers) instead")

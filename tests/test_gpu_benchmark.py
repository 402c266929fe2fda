"""benchmarks/gpu_train.py: says so without CUDA; its measuring path runs end to end (CPU smoke run)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from .conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_train.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine-without-CUDA answer")
def test_without_cuda_it_says_so_and_exits_0():
    assert run() == [{"cuda": False, "skipped": "no CUDA GPU: nothing measured"}]


def test_peak_flops_by_device_name():
    gpu = load_script()
    assert gpu.peak_tflops("NVIDIA H200") == 989
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == 756 and gpu.peak_tflops("NVIDIA H100 80GB HBM3") == 989
    assert gpu.peak_tflops("NVIDIA A100-SXM4-80GB") == 312 and gpu.peak_tflops("Tesla T4") is None


def test_real_shapes_count_their_published_sizes():
    from medtune.estimate import Architecture

    gpu = load_script()
    assert Architecture.from_config(gpu.SHAPES["qwen2.5-0.5b"][1]).parameters() == 494_032_768  # Qwen2.5-0.5B
    glm = Architecture.from_config(gpu.SHAPES["glm4-9b-4layers"][1])
    assert (glm.layers, glm.hidden, glm.vocab) == (4, 4096, 151552)


@pytest.mark.slow
def test_cpu_smoke_run_reports_packed_and_padded(tmp_path):
    rows = run("--allow_cpu", "--shapes", "tiny-test", "--steps", "3", "--warmup", "1", "--seq", "256",
               "--peak_tflops", "1")
    assert [(r["shape"], r["packing"]) for r in rows] == [("tiny-test", True), ("tiny-test", False)]
    for row in rows:
        assert row["steps_timed"] == 2 and 0 < row["real_token_fraction"] <= 1
        assert row["real_tokens_per_s"] <= row["tokens_per_s"]
        assert row["mfu"] == pytest.approx(row["model_tflops_per_s"], abs=0.006)  # peak 1 TFLOP/s

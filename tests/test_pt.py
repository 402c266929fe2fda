"""`medtune pt` end to end on the tiny GLM-4 model, as a user runs it (separate processes)."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, run_medtune

TINY = ["--config", str(REPO / "configs" / "pt_tiny.yaml")]


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


@pytest.fixture(scope="module")
def pt_run(tmp_path_factory):
    """init-model, then `medtune pt` with the shipped tiny config (LoRA, 60 steps); returns the output folder."""
    root = tmp_path_factory.mktemp("pt")
    model = root / "tiny-glm4"
    built = run_medtune("init-model", "--arch", "glm4", "--out", str(model))
    assert built.returncode == 0, built.stderr
    out = root / "out"
    result = run_medtune("pt", *TINY, "--model_name_or_path", str(model), "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return model, out, result


def test_pt_writes_adapter_checkpoint_tensorboard_and_results(pt_run):
    _, out, result = pt_run
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-40", "checkpoint-60"]  # limit 2
    assert list((out / "runs").glob("events.out.tfevents.*"))
    for name in ("train_results.json", "eval_results.json", "trainer_state.json", "medtune_config.yaml",
                 "data_stats.json"):
        assert (out / name).is_file(), name
    logged = [entry for entry in log_history(out) if "loss" in entry]
    assert logged and {"loss", "grad_norm", "learning_rate", "epoch"} <= set(logged[0])
    assert "'loss'" in result.stderr or "'loss'" in result.stdout  # shown while training


def test_eval_perplexity_falls(pt_run):
    _, out, _ = pt_run
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["eval_perplexity"] < metrics["eval_perplexity_before_training"]
    assert 0.0 <= metrics["eval_token_accuracy"] <= 1.0
    assert metrics["eval_perplexity"] == pytest.approx(2.718281828 ** metrics["eval_loss"], rel=1e-6)


def test_tokenized_corpus_is_cached_and_reused(pt_run, tmp_path):
    model, _, first = pt_run
    again = run_medtune("pt", *TINY, "--model_name_or_path", str(model), "--output_dir", str(tmp_path / "o"),
                        "--max_steps", "1", "--eval_on_start", "false")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "loading tokenized data from cache" in again.stderr
    stats = json.loads((tmp_path / "o" / "data_stats.json").read_text())
    assert stats["train"]["dropped_tokens"] == 0 and stats["train"]["blocks"] > 0


def test_fresh_run_into_a_folder_with_checkpoints_is_refused(pt_run):
    model, out, _ = pt_run
    result = run_medtune("pt", *TINY, "--model_name_or_path", str(model), "--output_dir", str(out))
    assert result.returncode == 2
    assert "already holds checkpoints" in result.stderr and "--resume_from_checkpoint true" in result.stderr


def test_full_fine_tuning_saves_a_whole_model(pt_run, tmp_path):
    model, _, _ = pt_run
    result = run_medtune("pt", *TINY, "--model_name_or_path", str(model), "--output_dir", str(tmp_path),
                         "--use_peft", "false", "--max_steps", "3", "--eval_steps", "3", "--save_steps", "3",
                         "--learning_rate", "1e-4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "adapter_config.json").exists()


def _resume_args(model: Path, out: Path) -> list[str]:
    return ["pt", *TINY, "--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", "30",
            "--save_steps", "10", "--logging_steps", "1", "--validation_split_percentage", "0",
            "--save_total_limit", "5", "--report_to", "none"]


def test_sigkill_then_resume_ends_with_the_same_loss(pt_run, tmp_path):
    model, _, _ = pt_run
    straight = tmp_path / "straight"
    assert run_medtune(*_resume_args(model, straight)).returncode == 0

    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "medtune", *_resume_args(model, killed)], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "checkpoint-10" / "trainer_state.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        try:
            json.loads(state.read_text())  # complete checkpoint on disk
            break
        except (FileNotFoundError, json.JSONDecodeError):
            time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "checkpoint-30").exists()

    resumed = run_medtune(*_resume_args(model, killed)[:-2], "--report_to", "none", "--resume_from_checkpoint", "true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr

    def final_loss(out: Path) -> float:
        return [e["loss"] for e in log_history(out) if "loss" in e and e["step"] == 30][0]

    assert abs(final_loss(killed) - final_loss(straight)) < 1e-3

    def train_loss(out: Path) -> float:
        return json.loads((out / "train_results.json").read_text())["train_loss"]

    # the summary covers all 30 steps, not only those run after the resume
    assert abs(train_loss(killed) - train_loss(straight)) < 1e-6
    steps_after_resume = [e["step"] for e in log_history(killed) if "loss" in e]
    assert steps_after_resume == list(range(1, 31))  # continued from the checkpoint, no step repeated or lost


def test_runs_under_torchrun_with_two_processes(pt_run, tmp_path):
    """The two processes form one gloo data-parallel run (tests/test_distributed.py compares it with one process)."""
    model, _, _ = pt_run
    out = tmp_path / "ddp"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medtune", "pt",
         *TINY, "--model_name_or_path", str(model), "--output_dir", str(out), "--max_steps", "4", "--eval_steps", "4",
         "--save_steps", "4", "--report_to", "none"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 1 of 2" in result.stderr and "ParallelMode.DISTRIBUTED" not in result.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-4").is_dir()
    assert not list(out.glob(".medtune-saving*"))
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    # each process reads every other batch of 8 blocks: an epoch is half as many steps as in one process
    blocks = json.loads((out / "data_stats.json").read_text())["train"]["blocks"]
    assert state["epoch"] == pytest.approx(4 / math.ceil(math.ceil(blocks / 8) / 2))


@pytest.mark.slow
def test_label_only_head_gives_the_standard_pt_loss(pt_run, tmp_path):
    """pt with the LM head at labelled positions only (the default) logs the losses of transformers' own loss."""
    model, _, _ = pt_run

    def losses(flag: str) -> list[float]:  # loss and grad norm of each step
        out = tmp_path / flag
        result = run_medtune("pt", *TINY, "--model_name_or_path", str(model), "--output_dir", str(out),
                             "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy",
                             "no", "--report_to", "none", "--loss_only_labels", flag)
        assert result.returncode == 0, result.stderr[-2000:]
        return [value for e in log_history(out) if "loss" in e for value in (e["loss"], e["grad_norm"])]

    assert losses("true") == pytest.approx(losses("false"), abs=1e-5)

"""Training stages as one data-parallel run of 2 CPU processes (torchrun, gloo), checked against one process.

DDP with 2 processes x per-device batch 4 sees the same 8 samples per step as one process with batch 8 (the
sampler is seeded alike and accelerate deals the per-device batches out in order), and averages the gradients of
the two halves, so the loss and gradient-norm trajectories must agree up to float32 summation order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import REPO

# float32 sums taken in another order (two halves, then all-reduce) differ in the last bits. A rank training alone
# (the old behaviour) would consume half the samples per step: the epoch check below catches that exactly.
# measured: losses within 1.1e-7, gradient norms within 2.0e-5 (pt, steps 3-4); the resumed steps were identical.
LOSS_TOLERANCE, GRAD_NORM_TOLERANCE = 1e-5, 1e-4

# a flat learning rate high enough for the loss to move in 4 steps
STAGES = {
    "pt": ["--config", str(REPO / "configs" / "pt_tiny.yaml"), "--learning_rate", "2e-2"],
    "sft": ["--config", str(REPO / "configs" / "sft_tiny.yaml"), "--learning_rate", "3e-3"],
}
# dropout draws differ per process, so it is off
COMMON = ["--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--lora_dropout", "0",
          "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--validation_split_percentage", "0",
          "--report_to", "none", "--seed", "7"]


def medtune(stage: str, model: Path, out: Path, cache: Path, *extra: str, processes: int = 1):
    launcher = [sys.executable, "-m", "medtune"]
    if processes > 1:  # --standalone: a free rendezvous port, so parallel test workers never collide
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                    str(processes), "-m", "medtune"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               MEDTUNE_CACHE_DIR=str(cache))
    result = subprocess.run([*launcher, stage, *STAGES[stage], *COMMON, "--model_name_or_path", str(model),
                             "--output_dir", str(out), *extra], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def trajectory(out: Path) -> dict[int, tuple[float, float, float]]:
    """step -> (loss, grad_norm, epoch) from the run's trainer_state.json."""
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {e["step"]: (e["loss"], e["grad_norm"], e["epoch"]) for e in history if "loss" in e}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_two_cpu_processes_train_as_one_run(stage, glm4_dir, tmp_path):
    two, one, resumed = tmp_path / "two", tmp_path / "one", tmp_path / "resumed"
    cache = tmp_path / "cache"
    result = medtune(stage, glm4_dir, two, cache, "--per_device_train_batch_size", "4", processes=2)

    # both ranks joined one gloo process group, and the tokenized data was built once: rank 0 built it, rank 1 read it
    for rank in (0, 1):
        assert f"distributed run: process {rank} of 2" in result.stderr
    assert "parallel_mode != ParallelMode.DISTRIBUTED" not in result.stderr
    assert result.stderr.count("loading tokenized data from cache") == 1
    assert len(list((cache / "tokenized").iterdir())) == 2  # the cache folder and its lock file

    # one set of outputs, written by rank 0 only
    assert json.loads((two / "trainer_state.json").read_text())["global_step"] == 4
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(two.glob(".medtune-saving*"))
    assert sorted(p.name for p in (two / "checkpoint-4").glob("rng_state*")) == ["rng_state_0.pth",
                                                                                   "rng_state_1.pth"]
    assert (two / "adapter_model.safetensors").is_file()

    # the same trajectory as one process with the same global batch (8)
    medtune(stage, glm4_dir, one, cache, "--per_device_train_batch_size", "8")
    distributed, single = trajectory(two), trajectory(one)
    assert sorted(distributed) == sorted(single) == [1, 2, 3, 4]
    for step in distributed:
        loss, grad_norm, epoch = distributed[step]
        assert epoch == single[step][2]  # same number of samples consumed per step
        assert loss == pytest.approx(single[step][0], rel=LOSS_TOLERANCE)
        assert grad_norm == pytest.approx(single[step][1], rel=GRAD_NORM_TOLERANCE)
    assert distributed[4][0] < distributed[1][0]  # it trained

    # the distributed checkpoint resumes in one process and continues the same trajectory
    medtune(stage, glm4_dir, resumed, cache, "--per_device_train_batch_size", "8",
            "--resume_from_checkpoint", str(two / "checkpoint-2"))
    after = trajectory(resumed)
    for step in (3, 4):
        assert after[step][0] == pytest.approx(distributed[step][0], rel=LOSS_TOLERANCE)
        assert after[step][1] == pytest.approx(distributed[step][1], rel=GRAD_NORM_TOLERANCE)


# --- the shipped launcher configs, loaded by the libraries that will read them, so a broken one fails CI ---

DEEPSPEED_CONFIGS = {"zero2.json": (2, None), "zero3.json": (3, None), "zero3_offload.json": (3, "cpu")}


def hf_deepspeed_config(path: Path, training_args: dict):
    """transformers' HfTrainerDeepSpeedConfig for `path`, with the "auto" values filled from `training_args`.

    With deepspeed installed this is what TrainingArguments(deepspeed=...) builds. Without it (CI, and any machine
    without a CUDA toolchain), transformers swaps the class's base for `object`; the same methods are then put on
    accelerate's HfDeepSpeedConfig, which is the base they are written for: parsing, "auto" filling and the
    mismatch checks are transformers' and accelerate's own code, and none of it imports deepspeed.
    """
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    if importlib.util.find_spec("deepspeed") is not None:
        args = TrainingArguments(deepspeed=str(path), **training_args)
        return args.hf_deepspeed_config, args
    methods = {name: value for name, value in vars(HfTrainerDeepSpeedConfig).items()
               if name not in ("__init__", "__dict__", "__weakref__")}
    config = type("TrainerDeepSpeedConfig", (HfDeepSpeedConfig,), methods)(str(path))
    config._dtype, config.mismatches = None, []
    args = TrainingArguments(**training_args)
    config.trainer_config_process(args)
    return config, args


@pytest.mark.parametrize("name", sorted(DEEPSPEED_CONFIGS))
def test_deepspeed_configs_fill_every_auto_value(name, glm4_dir, tmp_path):
    from transformers import AutoConfig

    stage, offload = DEEPSPEED_CONFIGS[name]
    training_args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=4,
                         learning_rate=1e-4, max_grad_norm=0.5, use_cpu=True)
    config, args = hf_deepspeed_config(REPO / "configs" / "deepspeed" / name, training_args)
    model = SimpleNamespace(config=AutoConfig.from_pretrained(glm4_dir))
    config.trainer_config_finalize(args, model, num_training_steps=100)  # raises on a value contradicting the args

    def autos(node, path=""):
        if isinstance(node, dict):
            return [p for key, value in node.items() for p in autos(value, f"{path}.{key}")]
        return [path] if node == "auto" else []

    assert autos(config.config) == []
    assert config.get_value("zero_optimization.stage") == stage
    assert config.get_value("train_micro_batch_size_per_gpu") == 2
    assert config.get_value("train_batch_size") == 2 * 4 * args.world_size
    assert config.get_value("gradient_clipping") == 0.5
    assert config.get_value("bf16.enabled") is False  # from --bf16, not the file
    hidden = model.config.hidden_size
    assert config.get_value("zero_optimization.reduce_bucket_size") == hidden * hidden
    assert config.get_value("zero_optimization.offload_optimizer.device") == offload
    assert config.get_value("zero_optimization.offload_param.device") == offload
    if offload:
        assert config.get_value("optimizer.params.lr") == 1e-4


def parse_accelerate_config(path: Path) -> tuple:
    """`accelerate launch --config_file path`'s own parsing: the launch arguments and the environment it gives the
    training processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "medtune", "sft"])
    args, _, _ = _validate_launch_command(args)
    return args, prepare_multi_gpu_env(args)


@pytest.mark.parametrize("arch, layer", [("glm4", "GlmDecoderLayer"), ("qwen2", "Qwen2DecoderLayer"),
                                         ("llama", "LlamaDecoderLayer")])
def test_fsdp_config_shards_fully_and_wraps_each_decoder_layer(arch, layer, tiny_model, monkeypatch):
    from accelerate import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    args, env = parse_accelerate_config(REPO / "configs" / "accelerate" / "fsdp.yaml")
    assert args.use_fsdp and args.num_processes == 8
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full shard
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    model = AutoModelForCausalLM.from_pretrained(tiny_model(arch))
    plugin.set_auto_wrap_policy(model)
    assert [cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]] == [layer]


def test_multi_node_config_names_two_machines():
    args, env = parse_accelerate_config(REPO / "configs" / "accelerate" / "multi_node.yaml")
    assert (args.multi_gpu, args.num_machines, args.num_processes, args.rdzv_backend) == (True, 2, 16, "static")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"

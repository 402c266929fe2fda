"""`medtune merge`: the merged model reproduces base+adapter logits in the base's dtype, carries the chat template's
stop ids, refuses adapters of another model and never leaves a half-written folder."""

import collections
import dataclasses
import errno
import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from medtune import cli
from medtune.config import MergeArguments, ModelArguments
from medtune.stages.merge import staging_dir

from .conftest import run_medtune


def build_adapter(base, folder, *, tokenizer=True, seed=0):
    """An adapter as `medtune sft` saves it (task CAUSAL_LM, tokenizer beside it), with non-zero LoRA B weights
    (B starts at zero, which would make any merge look right)."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    model.save_pretrained(folder)
    if tokenizer:
        AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def set_recorded_base(adapter, base_name):
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = base_name
    config_file.write_text(json.dumps(config))


def merge(*args, capsys=None):
    """`medtune merge ARGS` in this process (so faults can be injected); returns (exit code, stderr)."""
    if capsys is not None:
        capsys.readouterr()
    code = cli.main(["merge", *map(str, args)])
    return code, (capsys.readouterr().err if capsys is not None else "")


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("medtune: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def assert_nothing_left(out):
    assert not out.exists()
    assert not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


@pytest.fixture(scope="module")
def trained_adapter(glm4_dir, tmp_path_factory):
    return build_adapter(glm4_dir, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def bf16_base(glm4_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("glm4-bf16")
    AutoModelForCausalLM.from_pretrained(glm4_dir, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(glm4_dir).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bf16_adapter(bf16_base, tmp_path_factory):
    return build_adapter(bf16_base, tmp_path_factory.mktemp("adapter-bf16"))


def read_tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def test_merge_matches_base_plus_adapter(glm4_dir, trained_adapter, tmp_path):
    out = tmp_path / "merged"
    result = run_medtune("merge", "--base_model", str(glm4_dir), "--lora_model", str(trained_adapter),
                         "--output_dir", str(out), "--model_type", "chatglm")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "chat_template.jinja", "merge_check.json"):
        assert (out / name).is_file(), name
    check = json.loads((out / "merge_check.json").read_text())
    assert check["max_abs_logit_difference"] <= 1e-4 and check["saved_dtype"] == "float32"
    assert check["lora_weights_merged"] == 24  # 2 layers x 6 linear modules x (A, B)

    # independent check: reload both and compare on a fresh input
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("高血压患者应定期监测血压。", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(glm4_dir), trained_adapter)
        merged = AutoModelForCausalLM.from_pretrained(out)
        base = AutoModelForCausalLM.from_pretrained(glm4_dir)
        expected = reference(input_ids=ids).logits
        assert (merged(input_ids=ids).logits - expected).abs().max() < 1e-4
        assert (base(input_ids=ids).logits - expected).abs().max() > 1e-3  # the adapter really changed something


def test_bf16_base_merges_to_bf16_of_the_base_size(bf16_base, bf16_adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = merge("--lora_model", bf16_adapter, "--output_dir", out, capsys=capsys)
    assert code == 0, err
    tensors, base_tensors = read_tensors(out), read_tensors(bf16_base)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    base_size, merged_size = (bf16_base / "model.safetensors").stat().st_size, (out / "model.safetensors").stat().st_size
    assert abs(merged_size - base_size) <= 0.01 * base_size
    # Each merged weight is the float32 sum W + scale * B @ A rounded once into bf16; untouched weights are bitwise
    # the base's.
    with safe_open(str(bf16_adapter / "adapter_model.safetensors"), framework="pt") as handle:
        prefix = "base_model.model.model.layers.1.self_attn.q_proj"
        lora_a, lora_b = handle.get_tensor(f"{prefix}.lora_A.weight"), handle.get_tensor(f"{prefix}.lora_B.weight")
    name = "model.layers.1.self_attn.q_proj.weight"
    exact = base_tensors[name].float() + (8 / 4) * (lora_b.float() @ lora_a.float())
    assert torch.equal(tensors[name], exact.to(torch.bfloat16))
    assert not torch.equal(tensors[name], base_tensors[name])
    assert torch.equal(tensors["model.norm.weight"], base_tensors["model.norm.weight"])
    check = json.loads((out / "merge_check.json").read_text())
    assert check["saved_dtype"] == "bfloat16"
    assert 1e-4 < check["max_abs_logit_difference"] <= check["tolerance"] < check["adapter_effect"] / 10


def test_torch_dtype_is_honoured(bf16_base, bf16_adapter, tmp_path, capsys):
    out = tmp_path / "merged"
    code, err = merge("--lora_model", bf16_adapter, "--output_dir", out, "--torch_dtype", "float32", capsys=capsys)
    assert code == 0, err
    assert {t.dtype for t in read_tensors(out).values()} == {torch.float32}
    assert json.loads((out / "merge_check.json").read_text())["max_abs_logit_difference"] <= 1e-4


def test_a_wrong_merge_is_caught_at_bf16(bf16_adapter, tmp_path, capsys, monkeypatch):
    from peft.tuners.lora.layer import Linear

    exact = Linear.get_delta_weight
    monkeypatch.setattr(Linear, "get_delta_weight", lambda self, adapter: 1.1 * exact(self, adapter))
    out = tmp_path / "merged"
    code, err = merge("--lora_model", bf16_adapter, "--output_dir", out, capsys=capsys)
    assert_one_line_error(code, err, "logits differ from base+adapter", "nothing was written")
    assert_nothing_left(out)


# The template's stop tokens, and the eos a base checkpoint without a chat generation config would carry.
STOPS = {"glm4": ("glm4", ["<|endoftext|>", "<|user|>", "<|observation|>"]),
         "qwen2": ("qwen", ["<|im_end|>", "<|endoftext|>"]),
         "llama": ("llama3", ["<|eot_id|>", "<|end_of_text|>"])}


@pytest.fixture(scope="module")
def plain_eos_bases(tiny_model, tmp_path_factory):
    """Each tiny model with generation_config.json carrying only the tokenizer's eos (like Qwen2.5-7B base), and an
    adapter trained on it."""
    pairs = {}
    for arch in STOPS:
        base = tmp_path_factory.mktemp(f"{arch}-plain-eos")
        shutil.copytree(tiny_model(arch), base, dirs_exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(base)
        (base / "generation_config.json").write_text(json.dumps({"eos_token_id": tokenizer.eos_token_id}))
        pairs[arch] = base, build_adapter(base, tmp_path_factory.mktemp(f"{arch}-adapter"))
    return pairs


@pytest.mark.parametrize("arch", sorted(STOPS))
def test_generation_config_carries_the_templates_stop_ids(arch, plain_eos_bases, tmp_path, capsys):
    base, adapter = plain_eos_bases[arch]
    template, stops = STOPS[arch]
    out = tmp_path / "merged"
    code, err = merge("--lora_model", adapter, "--output_dir", out, "--template", template, capsys=capsys)
    assert code == 0, err
    tokenizer = AutoTokenizer.from_pretrained(base)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert set(eos) == set(tokenizer.convert_tokens_to_ids(stops)) and eos[0] == tokenizer.eos_token_id


def test_stop_ids_recorded_beside_the_adapter_reach_the_merged_model(plain_eos_bases, tmp_path, capsys):
    """Training writes the template's stop ids into the adapter folder's generation_config.json; merge keeps them."""
    base, trained = plain_eos_bases["qwen2"]
    adapter = tmp_path / "adapter"
    shutil.copytree(trained, adapter)
    tokenizer = AutoTokenizer.from_pretrained(base)
    stops = tokenizer.convert_tokens_to_ids(STOPS["qwen2"][1])
    (adapter / "generation_config.json").write_text(json.dumps({"eos_token_id": stops}))
    code, err = merge("--lora_model", adapter, "--output_dir", tmp_path / "merged", capsys=capsys)
    assert code == 0, err
    assert set(json.loads((tmp_path / "merged" / "generation_config.json").read_text())["eos_token_id"]) == set(stops)


# -- adapters that do not belong to the base ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen2_adapter(tiny_model, tmp_path_factory):
    return build_adapter(tiny_model("qwen2"), tmp_path_factory.mktemp("qwen2-adapter"))


def test_adapter_of_another_family_with_the_same_hidden_size_is_refused(tiny_model, qwen2_adapter, tmp_path, capsys):
    llama = tiny_model("llama")
    out = tmp_path / "merged"
    code, err = merge("--base_model", llama, "--lora_model", qwen2_adapter, "--output_dir", out, capsys=capsys)
    assert_one_line_error(code, err, str(qwen2_adapter), "model_type qwen2", "model_type llama")
    assert_nothing_left(out)


def test_another_models_tokenizer_is_refused_when_the_recorded_base_is_not_here(tiny_model, qwen2_adapter,
                                                                                tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(qwen2_adapter, adapter)
    set_recorded_base(adapter, "Qwen/Qwen2.5-7B-Instruct")  # a hub id: nothing to compare configs with
    out = tmp_path / "merged"
    code, err = merge("--base_model", tiny_model("llama"), "--lora_model", adapter, "--output_dir", out,
                      capsys=capsys)
    assert_one_line_error(code, err, "this tokenizer is not", "base tokens missing or with other ids")
    assert_nothing_left(out)


def test_every_lora_weight_must_find_a_module(glm4_dir, tiny_model, trained_adapter, tmp_path, capsys):
    """GLM-4's fused gate_up_proj has no module in Llama; peft would drop those weights without a word."""
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_adapter, adapter)
    set_recorded_base(adapter, "THUDM/glm-4-9b-chat-hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (adapter / name).unlink()
    out = tmp_path / "merged"
    code, err = merge("--base_model", tiny_model("llama"), "--lora_model", adapter, "--output_dir", out,
                      capsys=capsys)
    assert_one_line_error(code, err, "4 of 24 adapter weights found no module", "gate_up_proj")
    assert_nothing_left(out)


@pytest.fixture(scope="module")
def narrow_llama(tiny_model, tmp_path_factory):
    """The tiny Llama at half the hidden size (same tokenizer)."""
    from transformers import AutoConfig

    folder = tmp_path_factory.mktemp("llama-narrow")
    source = tiny_model("llama")
    config = AutoConfig.from_pretrained(source)
    config.hidden_size, config.intermediate_size = 128, 256
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)
    return folder


def test_adapter_of_another_size_is_refused(tiny_model, narrow_llama, tmp_path, capsys):
    adapter = build_adapter(tiny_model("llama"), tmp_path / "adapter")
    out = tmp_path / "merged"
    code, err = merge("--base_model", narrow_llama, "--lora_model", adapter, "--output_dir", out, capsys=capsys)
    assert_one_line_error(code, err, "hidden_size 256", "hidden_size 128")
    set_recorded_base(adapter, "meta-llama/Meta-Llama-3-8B-Instruct")  # no config to compare: peft's own check
    code, err = merge("--base_model", narrow_llama, "--lora_model", adapter, "--output_dir", out, capsys=capsys)
    assert_one_line_error(code, err, "trained on a model of another size", "size mismatch for")
    assert_nothing_left(out)


# -- the output folder --------------------------------------------------------------------------------------------

def test_merge_defaults_base_from_adapter_and_refuses_to_overwrite_inputs(glm4_dir, trained_adapter, capsys):
    code, err = merge("--lora_model", trained_adapter, "--output_dir", glm4_dir, capsys=capsys)
    assert_one_line_error(code, err, "is the base model's folder")
    code, err = merge("--lora_model", trained_adapter, "--output_dir", trained_adapter, capsys=capsys)
    assert_one_line_error(code, err, "is the adapter's folder")


def test_merge_rejects_a_folder_that_is_not_an_adapter(glm4_dir, tmp_path, capsys):
    code, err = merge("--lora_model", glm4_dir, "--output_dir", tmp_path / "x", capsys=capsys)
    assert_one_line_error(code, err, "no adapter_config.json")


def test_output_dir_that_is_a_file_is_refused(trained_adapter, tmp_path, capsys):
    target = tmp_path / "merged"
    target.write_text("keep me")
    code, err = merge("--lora_model", trained_adapter, "--output_dir", target, capsys=capsys)
    assert_one_line_error(code, err, "is a file, not a folder")
    code, err = merge("--lora_model", trained_adapter, "--output_dir", target / "inside", capsys=capsys)
    assert_one_line_error(code, err, "is a file, not a folder")
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_merge_killed_midway_leaves_no_folder_and_the_rerun_works(trained_adapter, tmp_path, capsys, caplog):
    out = tmp_path / "merged"
    leftover = tmp_path / ".merged.merging"  # what a merge killed while saving leaves behind
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    code, err = merge("--lora_model", trained_adapter, "--output_dir", out, capsys=capsys)
    assert code == 0, err
    assert "interrupted merge" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (out / "merge_check.json").is_file()


def test_interrupted_save_leaves_output_dir_as_it_was(trained_adapter, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    def interrupted(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", interrupted)
    out = tmp_path / "merged"
    out.mkdir()  # an empty folder made by the user stays
    code, err = merge("--lora_model", trained_adapter, "--output_dir", out, capsys=capsys)
    assert code == 130
    assert out.is_dir() and not any(out.iterdir()) and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("failure", ["oserror", "safetensors"])
def test_disk_full_while_saving(failure, trained_adapter, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils
    from safetensors import SafetensorError

    def disk_full(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 4096)  # the part that fitted
        if failure == "oserror":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**39, 5 * 2**30))
    out = tmp_path / "merged"
    code, err = merge("--lora_model", trained_adapter, "--output_dir", out, capsys=capsys)
    size = sum(p.numel() * p.element_size() for p in AutoModelForCausalLM.from_pretrained(
        json.loads((trained_adapter / "adapter_config.json").read_text())["base_model_name_or_path"]).parameters())
    assert code == 2 and err.splitlines()[-1] == (
        f"medtune: error: {staging_dir(out) / 'model.safetensors'}: no space left on device while saving the merged "
        f"model (it needs about {size / 2**20:.1f} MB; 5.0 GB free now); the partial output was removed")
    assert "Traceback" not in err and err.count("medtune: error:") == 1
    assert_nothing_left(out)


def test_not_enough_free_space_is_refused_before_writing(trained_adapter, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    out = tmp_path / "merged"
    code, err = merge("--lora_model", trained_adapter, "--output_dir", out, capsys=capsys)
    assert_one_line_error(code, err, "not enough disk space", "1000 B free", "nothing was written")
    assert_nothing_left(out)


# -- options ------------------------------------------------------------------------------------------------------

def test_each_merge_option_is_declared_once_and_the_books_names_work(capsys):
    model_fields = {f.name for f in dataclasses.fields(ModelArguments)}
    assert not model_fields & {f.name for f in dataclasses.fields(MergeArguments)}
    with pytest.raises(SystemExit) as exit_:
        cli.main(["merge", "--help"])
    shown = capsys.readouterr().out
    assert exit_.value.code == 0
    for option in ("--base_model", "--lora_model", "--tokenizer_path", "--torch_dtype", "--trust_remote_code",
                   "--model_type", "--template", "--check_tolerance"):
        assert option in shown, option


@pytest.mark.slow
def test_a_pipeline_killed_during_merge_finishes_on_rerun(tmp_path):
    """SIGKILL while the merged model is being written: no half folder at merged-pt/, and the re-run merges."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from .conftest import REPO

    out = tmp_path / "pipeline"
    staging = out / ".merged-pt.merging"
    pt_only = ("--skip", "sft", "dpo", "eval", "--pt.max_steps", "2")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    process = subprocess.Popen([sys.executable, "-m", "medtune", "pipeline", "--output_dir", str(out), *pt_only],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not staging.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-merge, not after it finished
    assert staging.exists() and not (out / "merged-pt").exists()
    again = run_medtune("pipeline", "--output_dir", str(out), *pt_only)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "interrupted merge" in again.stderr and not staging.exists()
    assert json.loads((out / "merged-pt" / "merge_check.json").read_text())["max_abs_logit_difference"] <= 1e-4


def test_the_check_computes_in_float32_without_changing_the_stored_weights(bf16_base):
    from medtune.stages.merge import float32_logits

    model = AutoModelForCausalLM.from_pretrained(bf16_base, dtype=torch.bfloat16)
    stored = {name: (p.data_ptr(), p.dtype) for name, p in model.named_parameters()}
    ids = torch.tensor([[5, 17, 230, 1024, 42]])
    logits = float32_logits(model, ids)
    assert {name: (p.data_ptr(), p.dtype) for name, p in model.named_parameters()} == stored  # put back, not copied
    with torch.no_grad():
        assert torch.equal(logits, model.float()(input_ids=ids).logits)


@pytest.mark.slow
def test_merge_memory_benchmark_runs():
    import subprocess
    import sys

    from .conftest import REPO

    result = subprocess.run([sys.executable, "benchmarks/merge_memory.py", "--hidden_size", "128", "--layers", "2"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["dtype"] == "bfloat16" and row["merged_weights_mb"] == row["weights_mb"]
    assert row["merge_peak_mb"] > row["runtime_peak_mb"]

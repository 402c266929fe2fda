"""What a training stage leaves in (and refuses to do to) its output folder: stop ids in generation_config.json,
no overwriting of a model or a finished run, train_loss over a resumed run, a full disk named; plus the loading
and perplexity paths that must work on a plain base model."""

from __future__ import annotations

import collections
import errno
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer

from medtune.config import parse_arguments
from medtune.errors import ConfigError, MedtuneError
from medtune.stages import dpo, pt, sft
from medtune.stages.common import STAGING_FOLDER, whole_run_train_loss

from .conftest import REPO, run_medtune

PT_TINY = ["--config", str(REPO / "configs" / "pt_tiny.yaml"), "--report_to", "none"]
SFT_TINY = ["--config", str(REPO / "configs" / "sft_tiny.yaml"), "--report_to", "none"]
DPO_TINY = ["--config", str(REPO / "configs" / "dpo_tiny.yaml"), "--report_to", "none"]
QUICK = ["--max_steps", "2", "--validation_split_percentage", "0", "--save_strategy", "no"]
STOP_TOKENS = {"glm4": ["<|user|>", "<|observation|>"], "qwen2": ["<|im_end|>"], "llama": ["<|eot_id|>"]}


RUNNERS = {pt: pt.run_pt, sft: sft.run_sft, dpo: dpo.run_dpo}


def run_stage(stage, config: list[str], model: Path, out: Path, *extra: str) -> dict:
    """The stage run in this process, as the CLI runs it."""
    return RUNNERS[stage](*parse_arguments(stage.ARGUMENT_TYPES, [*config, "--model_name_or_path", str(model),
                                                                  "--output_dir", str(out), *extra]))


def saved_eos_ids(out: Path) -> list[int]:
    return json.loads((out / "generation_config.json").read_text())["eos_token_id"]


def token_ids(model: Path, tokens: list[str]) -> list[int]:
    vocabulary = json.loads((model / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
    ids = {t["content"]: t["id"] for t in vocabulary}
    return [ids[t] for t in tokens]


def base_model_copy(model: Path, folder: Path, *, eos: str | None = None, chat_template: bool = True) -> Path:
    """A copy of a tiny model as base checkpoints often ship: generation_config.json knowing only the document
    end (`eos`), and/or no chat template."""
    copy = Path(shutil.copytree(model, folder))
    if eos is not None:
        config = json.loads((copy / "generation_config.json").read_text())
        config["eos_token_id"] = token_ids(copy, [eos])[0]
        config["temperature"] = 0.7  # without do_sample, as some published configs have it: must still save
        (copy / "generation_config.json").write_text(json.dumps(config))
    if not chat_template:
        (copy / "chat_template.jinja").unlink(missing_ok=True)
        tokenizer_config = json.loads((copy / "tokenizer_config.json").read_text())
        tokenizer_config.pop("chat_template", None)
        (copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return copy


def folder_snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- stop ids in generation_config.json -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("arch", ["glm4", "qwen2", "llama"])
def test_lora_adapter_folder_carries_the_template_stop_ids(tiny_model, tmp_path, arch):
    model = tiny_model(arch)
    run_stage(sft, SFT_TINY, model, tmp_path, *QUICK)
    assert (tmp_path / "adapter_config.json").is_file()
    eos = saved_eos_ids(tmp_path)
    assert set(token_ids(model, STOP_TOKENS[arch])) <= set(eos), eos


@pytest.mark.slow
def test_full_fine_tune_adds_the_template_stops_to_a_base_generation_config(tiny_model, tmp_path):
    # A Qwen base checkpoint's generation config knows only <|endoftext|>; trained on the qwen template, the model
    # ends replies with <|im_end|>, which must stop generation too.
    base = base_model_copy(tiny_model("qwen2"), tmp_path / "base", eos="<|endoftext|>")
    run_stage(sft, SFT_TINY, base, tmp_path / "out", *QUICK, "--use_peft", "false", "--template", "qwen")
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert saved_eos_ids(tmp_path / "out") == token_ids(base, ["<|endoftext|>", "<|im_end|>"])


# -- output folders that must not be written --------------------------------------------------------------------

STAGES = [(pt, PT_TINY), (sft, SFT_TINY), (dpo, DPO_TINY)]


@pytest.mark.parametrize("stage,config", STAGES, ids=["pt", "sft", "dpo"])
def test_output_dir_that_is_the_model_folder_is_refused(glm4_dir, stage, config):
    before = folder_snapshot(glm4_dir)
    result = run_medtune(stage.__name__.rsplit(".", 1)[-1], *config, "--model_name_or_path", str(glm4_dir),
                         "--output_dir", str(glm4_dir), "--use_peft", "false")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"medtune: error: {glm4_dir}: output_dir is the model folder {glm4_dir}; writing there would overwrite or "
        "mix with the model's files: choose another --output_dir"]
    assert folder_snapshot(glm4_dir) == before


@pytest.mark.parametrize("stage,config", STAGES, ids=["pt", "sft", "dpo"])
def test_output_dir_inside_the_model_folder_is_refused(glm4_dir, stage, config):
    before = folder_snapshot(glm4_dir)
    with pytest.raises(ConfigError, match=r"output_dir is inside the model folder .*: choose another --output_dir"):
        run_stage(stage, config, glm4_dir, glm4_dir / "finetuned")
    assert folder_snapshot(glm4_dir) == before


@pytest.mark.slow
def test_second_run_into_a_finished_folder_is_refused_and_leaves_it_as_it_was(glm4_dir, tmp_path):
    first = run_medtune("pt", *PT_TINY, *QUICK, "--model_name_or_path", str(glm4_dir), "--output_dir", str(tmp_path))
    assert first.returncode == 0, first.stderr[-2000:]
    before = folder_snapshot(tmp_path)
    again = run_medtune("pt", *PT_TINY, *QUICK, "--model_name_or_path", str(glm4_dir), "--output_dir", str(tmp_path),
                        "--learning_rate", "1e-5")
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"medtune: error: {tmp_path}: already holds a finished run (adapter_model.safetensors, train_results.json) "
        "that this run would overwrite; choose a new --output_dir, or move that run away first"]
    # resume requested, but there is no checkpoint to resume: still refused, not trained from scratch over it
    resumed = run_medtune("pt", *PT_TINY, *QUICK, "--model_name_or_path", str(glm4_dir), "--output_dir",
                          str(tmp_path), "--resume_from_checkpoint", "true")
    assert resumed.returncode == 2 and "and no checkpoint to resume from" in resumed.stderr
    assert folder_snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_run_that_fails_on_its_data_keeps_the_folder_config(glm4_dir, tmp_path):
    # A finished run with a checkpoint may be continued (--resume_from_checkpoint true); a continuation that fails
    # before training must not rewrite how the finished run was made.
    run_stage(pt, PT_TINY, glm4_dir, tmp_path, "--max_steps", "1", "--save_steps", "1",
              "--validation_split_percentage", "0")
    config = (tmp_path / "medtune_config.yaml").read_text()
    bad = tmp_path.parent / "bad.jsonl"
    bad.write_text('{"text": "糖尿病"}\n{"txt": 1}\n', encoding="utf-8")
    with pytest.raises(MedtuneError, match="bad.jsonl:2"):
        run_stage(pt, PT_TINY, glm4_dir, tmp_path, "--max_steps", "2", "--resume_from_checkpoint", "true",
                  "--train_file_dir", str(bad), "--validation_split_percentage", "0")
    assert (tmp_path / "medtune_config.yaml").read_text() == config


# -- resume ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_train_loss_after_a_resume_averages_the_whole_run(glm4_dir, tmp_path):
    steady = ["--lr_scheduler_type", "constant", "--warmup_steps", "0", "--logging_steps", "1", "--save_steps", "3",
              "--validation_split_percentage", "0"]
    run_stage(pt, PT_TINY, glm4_dir, tmp_path / "straight", "--max_steps", "6", *steady)
    # stopped after step 3 (its checkpoint on disk), then continued to step 6
    run_stage(pt, PT_TINY, glm4_dir, tmp_path / "resumed", "--max_steps", "3", *steady)
    run_stage(pt, PT_TINY, glm4_dir, tmp_path / "resumed", "--max_steps", "6", *steady, "--resume_from_checkpoint",
              "true")

    def losses(out: Path) -> list[float]:
        history = json.loads((out / "trainer_state.json").read_text())["log_history"]
        return [entry["loss"] for entry in history if "loss" in entry]

    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)  # same run

    def train_loss(out: Path) -> float:
        return json.loads((out / "train_results.json").read_text())["train_loss"]

    assert train_loss(tmp_path / "resumed") == pytest.approx(train_loss(tmp_path / "straight"), abs=1e-6)
    assert train_loss(tmp_path / "straight") == pytest.approx(sum(losses(tmp_path / "straight")) / 6, abs=1e-9)


def test_whole_run_train_loss_weights_each_logged_loss_by_its_steps():
    history = [{"loss": 4.0, "step": 2}, {"eval_loss": 9.0, "step": 2}, {"loss": 3.0, "step": 4},
               {"loss": 1.0, "step": 6}]  # the last entry was logged after resuming at step 4
    assert whole_run_train_loss(history, resumed_at=4, last_step=7, loss_since_resume=1.5) == pytest.approx(
        (4.0 * 2 + 3.0 * 2 + 1.5 * 3) / 7)


def test_resume_from_a_checkpoint_with_a_cut_trainer_state_is_one_line(glm4_dir, tmp_path):
    checkpoint = tmp_path / "old" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 10, "log_hi')
    out = tmp_path / "new"
    result = run_medtune("pt", *PT_TINY, "--model_name_or_path", str(glm4_dir), "--output_dir", str(out),
                         "--resume_from_checkpoint", str(checkpoint))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"medtune: error: {checkpoint / 'trainer_state.json'}:1: invalid JSON (Unterminated string starting at); "
        "the checkpoint is incomplete (killed while saving?); pass an earlier checkpoint-N or 'true'"]
    assert not out.exists()


# -- a full disk ------------------------------------------------------------------------------------------------

def no_space(path: str) -> Exception:
    return OSError(errno.ENOSPC, "No space left on device", str(Path(path) / "model.safetensors"))


def safetensors_no_space(path: str) -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def fill_disk_when_saving(monkeypatch, into: str, error) -> None:
    """Trainer.save_model writes a partial file, then fails as a full disk does, when saving into `into`."""
    real = Trainer.save_model

    def save_model(self, output_dir=None, _internal_call=False):
        if Path(output_dir).name != into:
            return real(self, output_dir, _internal_call)
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
        raise error(output_dir)

    monkeypatch.setattr(Trainer, "save_model", save_model)


FULL = ["--use_peft", "false", "--max_steps", "4", "--save_steps", "2", "--validation_split_percentage", "0"]


@pytest.mark.slow
@pytest.mark.parametrize("error", [no_space, safetensors_no_space])
def test_disk_full_while_saving_a_checkpoint(glm4_dir, tmp_path, monkeypatch, error):
    fill_disk_when_saving(monkeypatch, "checkpoint-4", error)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**39, 3 * 2**20))
    with pytest.raises(MedtuneError) as failure:
        run_stage(pt, PT_TINY, glm4_dir, tmp_path, *FULL)
    named = tmp_path / "checkpoint-4" / "model.safetensors" if error is no_space else tmp_path / "checkpoint-4"
    # needed: the full model's float32 weights + Adam's two moments per weight
    weights = sum(t.numel() for t in load_file(str(glm4_dir / "model.safetensors")).values())
    assert str(failure.value) == (
        f"{named}: no space left on device (about {3 * 4 * weights / 2**20:.1f} MB needed, 3.0 MB free); the "
        f"unfinished checkpoint-4 was removed, the previous checkpoint {tmp_path / 'checkpoint-2'} is intact; free "
        "some space and run again with --resume_from_checkpoint true")
    assert failure.value.exit_code == 2
    assert not (tmp_path / "checkpoint-4").exists()
    assert json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    assert (tmp_path / "checkpoint-2" / "model.safetensors").stat().st_size > 1000


@pytest.mark.slow
def test_disk_full_while_saving_the_final_model_leaves_no_partial_weights(glm4_dir, tmp_path, monkeypatch):
    fill_disk_when_saving(monkeypatch, STAGING_FOLDER, no_space)
    with pytest.raises(MedtuneError, match="no space left on device") as failure:
        run_stage(pt, PT_TINY, glm4_dir, tmp_path, *FULL)
    assert f"the unfinished {STAGING_FOLDER} was removed, the checkpoints are intact" in str(failure.value)
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / STAGING_FOLDER).exists()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


# -- loading ----------------------------------------------------------------------------------------------------

def test_flash_attention_without_flash_attn_falls_back_to_sdpa_with_one_warning(glm4_dir, caplog):
    from transformers.utils import is_flash_attn_2_available

    from medtune.models.loader import load_model

    if is_flash_attn_2_available():
        pytest.skip("flash-attn and a GPU are present: nothing to fall back from")
    with caplog.at_level(logging.WARNING, logger="medtune"):
        model = load_model(str(glm4_dir), attn_implementation="flash_attention_2")
    assert model.config._attn_implementation == "sdpa"
    assert [r.getMessage() for r in caplog.records] == [
        "attn_implementation flash_attention_2 needs a CUDA GPU and the flash-attn package (pip install "
        "'medtune[gpu]' or pip install flash-attn); using sdpa instead"]


@pytest.mark.slow
def test_shipped_gpu_config_on_a_cpu_says_bf16_false(glm4_dir, tmp_path):
    from transformers.utils import is_torch_bf16_gpu_available

    if is_torch_bf16_gpu_available():
        pytest.skip("this machine trains in bf16")
    gpu_config = ["--config", str(REPO / "configs" / "sft_glm4_9b_chat_lora.yaml")]
    refused = run_medtune("sft", *gpu_config, "--model_name_or_path", str(glm4_dir), "--output_dir",
                          str(tmp_path / "a"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "medtune: error: bf16: true needs a GPU with bfloat16 support and none was found; on this machine pass "
        "--bf16 false (and --torch_dtype float32) to train in float32"]
    # with the advice followed, the same config (flash_attention_2 included) trains
    ran = run_medtune("sft", *gpu_config, "--model_name_or_path", str(glm4_dir), "--output_dir", str(tmp_path / "b"),
                      "--bf16", "false", "--torch_dtype", "float32", "--max_steps", "1", "--model_max_length", "256",
                      "--gradient_accumulation_steps", "1", "--validation_split_percentage", "0", "--report_to",
                      "none")
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stderr.count("flash_attention_2 needs a CUDA GPU and the flash-attn package") == 1


def test_a_pickled_only_model_loads_with_one_log_line_and_safetensors_win_when_both_exist(glm4_dir, tmp_path, caplog):
    from medtune.models.loader import load_model

    weights = load_file(str(glm4_dir / "model.safetensors"))
    only_bin = Path(shutil.copytree(glm4_dir, tmp_path / "bin"))
    (only_bin / "model.safetensors").unlink()
    torch.save(weights, only_bin / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="medtune"):
        model = load_model(str(only_bin))
    assert [r.getMessage() for r in caplog.records] == [
        f"{only_bin} has only pytorch_model.bin (no safetensors): loading it with torch.load(weights_only=True); "
        "saving the model again (e.g. `medtune merge`) writes safetensors"]
    name, tensor = next(iter(weights.items()))
    assert torch.equal(model.state_dict()[name], tensor)

    both = Path(shutil.copytree(glm4_dir, tmp_path / "both"))
    torch.save({k: torch.zeros_like(v) for k, v in weights.items()}, both / "pytorch_model.bin")
    caplog.clear()
    model = load_model(str(both))
    assert torch.equal(model.state_dict()[name], tensor) and not caplog.records


# -- perplexity ---------------------------------------------------------------------------------------------------

def test_eval_ppl_on_a_base_model_without_chat_template_measures_held_out_text(glm4_dir, tmp_path):
    from medtune.config import PretrainDataArguments
    from medtune.data.pretrain import load_documents

    base = base_model_copy(glm4_dir, tmp_path / "base", chat_template=False)
    out = tmp_path / "ppl"
    result = run_medtune("eval", "ppl", "--model_name_or_path", str(base), "--output_dir", str(out),
                         "--block_size", "64")
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "perplexity.json").read_text())
    training, held_out = load_documents(PretrainDataArguments())
    assert results["documents"] == len(held_out) == 10 and len(training) == 191
    assert "the 5% of documents `medtune pt` holds out by default" in results["data"]
    assert f"perplexity on 10 documents of {results['data']}" in result.stderr
    # the same documents measured explicitly give the same number
    explicit = tmp_path / "held_out.jsonl"
    explicit.write_text("".join(json.dumps({"text": d.text}, ensure_ascii=False) + "\n" for d in held_out),
                        encoding="utf-8")
    again = run_medtune("eval", "ppl", "--model_name_or_path", str(base), "--output_dir", str(tmp_path / "ppl2"),
                        "--block_size", "64", "--data_dir", str(explicit))
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "ppl2" / "perplexity.json").read_text())["loss"] == pytest.approx(results["loss"])


def test_eval_ppl_into_the_model_folder_is_refused(glm4_dir):
    result = run_medtune("eval", "ppl", "--model_name_or_path", str(glm4_dir), "--output_dir", str(glm4_dir))
    assert result.returncode == 2 and "output_dir is the model folder" in result.stderr
    assert not (glm4_dir / "perplexity.json").exists()


# -- preference stages -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dpo_reports_no_perplexity_of_its_preference_loss(glm4_dir, tmp_path):
    metrics = run_stage(dpo, DPO_TINY, glm4_dir, tmp_path,
                        "--max_steps", "1", "--eval_steps", "1", "--save_strategy", "no",
                        "--validation_split_percentage", "10", "--precompute_ref_log_probs", "false")
    saved = json.loads((tmp_path / "eval_results.json").read_text())
    assert "eval_loss_before_training" in saved and "eval_loss" in saved
    assert not [key for key in {**saved, **metrics} if "perplexity" in key]

"""pt options beyond the default path: resume selection, early stopping, streaming, `datasets` sources."""

import json
from pathlib import Path

import pytest

from medtune.config import parse_arguments
from medtune.errors import ConfigError
from medtune.stages import pt
from medtune.stages.common import complete_checkpoints, resolve_resume_checkpoint

from .conftest import REPO

TINY = ["--config", str(REPO / "configs" / "pt_tiny.yaml"), "--report_to", "none"]


def run_pt_in_process(model: Path, out: Path, *extra: str) -> dict:
    return pt.run_pt(*parse_arguments(pt.ARGUMENT_TYPES, [*TINY, "--model_name_or_path", str(model),
                                                          "--output_dir", str(out), *extra]))


def fake_checkpoint(out: Path, step: int, complete: bool = True) -> Path:
    folder = out / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_resume_true_picks_the_latest_complete_checkpoint(tmp_path):
    fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20)
    fake_checkpoint(tmp_path, 30, complete=False)  # killed while saving
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20"]
    (_, _, _, args) = parse_arguments(pt.ARGUMENT_TYPES, ["--output_dir", str(tmp_path),
                                                         "--resume_from_checkpoint", "true"])
    assert resolve_resume_checkpoint(args) == str(tmp_path / "checkpoint-20")


def test_resume_from_a_folder_that_is_not_a_checkpoint_is_an_error(tmp_path):
    (_, _, _, args) = parse_arguments(pt.ARGUMENT_TYPES, ["--output_dir", str(tmp_path / "o"),
                                                         "--resume_from_checkpoint", str(tmp_path)])
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        resolve_resume_checkpoint(args)


def test_resume_true_without_checkpoints_starts_fresh(tmp_path):
    (_, _, _, args) = parse_arguments(pt.ARGUMENT_TYPES, ["--output_dir", str(tmp_path),
                                                         "--resume_from_checkpoint", "true"])
    assert resolve_resume_checkpoint(args) is None


def test_early_stopping_stops_a_diverging_run(glm4_dir, tmp_path):
    # A huge learning rate makes eval loss rise; patience 1 must stop well before max_steps.
    run_pt_in_process(glm4_dir, tmp_path, "--learning_rate", "3.0", "--max_steps", "40", "--eval_steps", "2",
                      "--save_steps", "2", "--early_stopping_patience", "1", "--lr_scheduler_type", "constant")
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] < 40
    assert state["best_model_checkpoint"] is not None


def test_early_stopping_without_eval_set_is_a_config_error(glm4_dir, tmp_path):
    with pytest.raises(ConfigError, match="early_stopping_patience needs an evaluation set"):
        run_pt_in_process(glm4_dir, tmp_path, "--validation_split_percentage", "0", "--early_stopping_patience", "2")


def test_streaming_trains_from_a_lazy_stream(glm4_dir, tmp_path):
    metrics = run_pt_in_process(glm4_dir, tmp_path / "o", "--streaming", "true", "--max_steps", "3",
                                "--eval_steps", "3", "--save_steps", "3",
                                "--validation_file_dir", str(REPO / "data" / "pretrain" / "drug_safety.jsonl"))
    assert "eval_perplexity" in metrics
    assert json.loads((tmp_path / "o" / "trainer_state.json").read_text())["global_step"] == 3


def test_streaming_needs_max_steps(glm4_dir, tmp_path):
    with pytest.raises(ConfigError, match="streaming needs --max_steps"):
        run_pt_in_process(glm4_dir, tmp_path, "--streaming", "true", "--max_steps", "-1")


def test_datasets_source_with_text_column(glm4_dir, tmp_path):
    source = tmp_path / "hub_like"
    source.mkdir()
    lines = [json.dumps({"text": f"第{i}段：社区获得性肺炎需要评估严重程度后选择抗菌药物。"}, ensure_ascii=False)
             for i in range(40)]
    (source / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    metrics = run_pt_in_process(glm4_dir, tmp_path / "o", "--dataset_name", str(source), "--max_steps", "2",
                                "--eval_steps", "2", "--save_steps", "2", "--block_size", "32")
    assert metrics["eval_loss"] > 0

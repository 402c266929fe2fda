"""The README's main job: `medtune pipeline` on the embedded default, and its promises."""

import json
import shutil

import pytest
import yaml

from .conftest import REPO, run_medtune

SHORT = ("--max_steps", "2", "--eval_steps", "2", "--save_steps", "2")


@pytest.mark.slow
def test_pipeline_runs_pt_then_merge_and_resumes(tmp_path):
    out = tmp_path / "pipeline"
    first = run_medtune("pipeline", "--output_dir", str(out), "--max_steps", "20")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "pt" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "merged" / "merge_check.json").read_text())["max_abs_logit_difference"] <= 1e-4
    report = (out / "report.md").read_text()
    assert "eval perplexity before → after" in report and "max logit difference" in report
    adapter = (out / "pt" / "adapter_model.safetensors").read_bytes()
    again = run_medtune("pipeline", "--output_dir", str(out), "--max_steps", "20")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pt: already finished" in again.stderr and "merge: already finished" in again.stderr
    assert (out / "pt" / "adapter_model.safetensors").read_bytes() == adapter


def pt_options(out) -> dict:
    return yaml.safe_load((out / "pt" / "medtune_config.yaml").read_text())


@pytest.mark.slow
def test_pipeline_reruns_a_stage_whose_option_or_data_changed_and_redoes_an_interrupted_merge(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO / "data" / "pretrain", corpus)
    out = tmp_path / "pipeline"
    args = ("pipeline", "--output_dir", str(out), "--train_file_dir", str(corpus), *SHORT)
    assert run_medtune(*args).returncode == 0
    first_merge = (out / "merged" / "model.safetensors").read_bytes()

    # A changed learning rate: pt and merge run again, and the log says which option changed.
    changed = run_medtune(*args, "--learning_rate", "1e-4")
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "pt: running again from scratch (learning_rate 0.002 -> 0.0001)" in changed.stderr
    assert pt_options(out)["learning_rate"] == 1e-4
    assert (out / "merged" / "model.safetensors").read_bytes() != first_merge  # the new adapter, merged again

    # Killed during merge: the merged folder is half-written and the state says the merge never finished.
    state = json.loads((out / "pipeline_state.json").read_text())
    state["merged"]["finished"] = False
    (out / "pipeline_state.json").write_text(json.dumps(state))
    (out / "merged" / "merge_check.json").unlink()
    (out / "merged" / "model.safetensors").write_bytes(b"cut")
    resumed = run_medtune(*args, "--learning_rate", "1e-4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "pt: already finished" in resumed.stderr and "running it again" in resumed.stderr
    assert json.loads((out / "merged" / "merge_check.json").read_text())["max_abs_logit_difference"] <= 1e-4

    # Changed data: one file edited, so pt runs again, naming the file.
    edited = sorted(corpus.glob("*.txt"))[0]
    edited.write_text(edited.read_text(encoding="utf-8") + "新增一段关于高血压随访的文字。\n", encoding="utf-8")
    rerun = run_medtune(*args, "--learning_rate", "1e-4")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"pt: running again from scratch ({edited} changed)" in rerun.stderr


def test_pipeline_refuses_stage_folders_it_has_no_record_of(tmp_path):
    out = tmp_path / "pipeline"
    (out / "pt").mkdir(parents=True)
    (out / "pt" / "adapter_model.safetensors").write_bytes(b"someone else's")
    result = run_medtune("pipeline", "--output_dir", str(out), *SHORT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"medtune: error: {out / 'pt'} exists but {out / 'pipeline_state.json'} does not record how it was made; "
        "choose a new --output_dir (or delete that folder)")
    assert (out / "pt" / "adapter_model.safetensors").read_bytes() == b"someone else's"


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q'
    assert command in readme and command in ci
    assert "pip install torch==2.13.0 -e . && medtune pipeline" in readme

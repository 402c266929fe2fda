"""The README's main job: `medtune pipeline` on the embedded default, and its promises."""

import json

from .conftest import REPO, run_medtune


def test_pipeline_runs_pt_then_merge_and_resumes(tmp_path):
    out = tmp_path / "pipeline"
    first = run_medtune("pipeline", "--output_dir", str(out), "--max_steps", "20")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "pt" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "merged" / "merge_check.json").read_text())["max_abs_logit_difference"] <= 1e-4
    report = (out / "report.md").read_text()
    assert "eval perplexity before → after" in report and "max logit difference" in report
    again = run_medtune("pipeline", "--output_dir", str(out))
    assert again.returncode == 0 and "pt: already finished" in again.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q'
    assert command in readme and command in ci
    assert "pip install torch==2.13.0 -e . && medtune pipeline" in readme

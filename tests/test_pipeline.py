"""The README's main job: `medtune pipeline` runs pt -> merge -> sft -> merge -> dpo -> merge -> eval, and its
promises: every model evaluated on the same items, re-runs skip what finished, a changed option re-runs that stage
and every later one (saying why), --from, and a killed merge recovers."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, run_medtune

FAST = str(REPO / "tests" / "data" / "pipeline_fast.yaml")
STEPS = ("pt", "merge-pt", "sft", "merge-sft", "dpo", "merge-dpo", "eval")
FOLDERS = ("pt", "merged-pt", "sft", "merged-sft", "dpo", "merged-dpo")
PT_ONLY = ("--skip", "sft", "dpo", "eval", "--pt.max_steps", "2", "--pt.eval_steps", "2", "--pt.save_steps", "2")


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def file_stamps(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder` -> (mtime_ns, sha256): unchanged means not rewritten."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def answered_ids(out: Path, model: str, measure: str) -> list[str]:
    return [a["id"] for a in json.loads((out / "eval" / model / measure / "answers.json").read_text())]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One complete fast pipeline run on the embedded default model: (output folder, its CompletedProcess)."""
    out = tmp_path_factory.mktemp("pipeline") / "out"
    return out, ok(run_medtune("pipeline", "--config", FAST, "--output_dir", str(out)))


def copy_of(finished, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(finished[0], copy)  # copy2 keeps mtimes, so the models' fingerprints match
    return copy


@pytest.mark.slow
def test_pipeline_trains_every_stage_on_the_previous_one_and_evaluates_every_model_on_the_same_items(finished):
    out, result = finished
    results = json.loads((out / "pipeline_results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "pt", "sft", "dpo"]
    assert [m["path"] for m in results["models"][1:]] == [str(out.resolve() / f) for f in
                                                          ("merged-pt", "merged-sft", "merged-dpo")]
    assert results["random_weights"] is True
    # each stage trained on the previous stage's merged model, and each merge folded in that stage's adapter
    for stage, base in (("sft", "merged-pt"), ("dpo", "merged-sft")):
        trained_on = yaml.safe_load((out / stage / "medtune_config.yaml").read_text())["model_name_or_path"]
        assert Path(trained_on) == out.resolve() / base
    test_ids = [item["id"] for item in json.loads((REPO / "data/eval/cmb/test.json").read_text())]
    val_ids = [item["id"] for item in json.loads((REPO / "data/eval/cmb/val.json").read_text())]
    for model in ("base", "pt", "sft", "dpo"):
        assert answered_ids(out, model, "cmb_exam") == test_ids[:8]  # eval limit: 8
        assert answered_ids(out, model, "cmb_exam_generate") == test_ids[:2]  # generate_limit: 2
        evaluation = results["evaluations"][model]
        assert [item["id"] for item in evaluation["safety"]["items"]] == [f"safety-{n:03d}" for n in range(1, 61)]
        assert evaluation["clin"]["cases"] == 1 and evaluation["perplexity"]["documents"] == 10
        assert evaluation["cmb_exam"]["items"] == 8 and 0 < evaluation["cmb_exam"]["chance"] < 1
        assert answered_ids(out, model, "general") == val_ids[:8]
    assert set(results["training"]) == {"pt", "sft", "dpo"}
    assert [e["step"] for e in results["training"]["dpo"]["log_history"] if "loss" in e] == [1, 2]
    assert "rewards/accuracies" in results["training"]["dpo"]["log_history"][0]
    assert {(e["stage"], Path(e["file"]).name) for e in results["data"]} == {
        ("pt", "drug_safety.jsonl"), ("pt", "infectious_diseases.txt"), ("pt", "internal_medicine.txt"),
        ("sft", "medical_sharegpt_part1.jsonl"), ("sft", "medical_sharegpt_part2.jsonl"),
        ("dpo", "medical_preference.jsonl")}
    dpo_data = next(e for e in results["data"] if e["stage"] == "dpo")
    assert len(dpo_data["token_lengths"]) == 2 * dpo_data["records"]  # chosen and rejected, each with the prompt
    assert list(results["stages_wall_s"]) == list(STEPS)
    manifest = json.loads((out / "run_manifest.json").read_text())
    corpus = REPO / "data" / "pretrain" / "internal_medicine.txt"
    assert manifest["input_files_sha256"][str(corpus)] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert manifest["steps"]["sft"]["options"]["learning_rate"] == 3e-3
    assert set(manifest["packages"]) >= {"torch", "transformers", "trl", "peft", "datasets", "accelerate", "medtune"}
    assert all(manifest["steps"][step]["peak_rss_mb"] > 0 for step in STEPS)
    assert (out / "report.html").is_file() and "| dpo |" in (out / "report.md").read_text()
    # one line per step start and finish; no stray bars or library warnings
    for number, step in enumerate(STEPS, start=1):
        assert f"[{number}/7] {step}: started" in result.stderr
        assert f"[{number}/7] {step}: finished in " in result.stderr
    for stray in ("Loading weights", "Saving the dataset", "Generating train split", "Warning"):
        assert stray not in result.stderr


@pytest.mark.slow
def test_the_pipeline_report_opens_in_a_browser_with_every_chart_and_every_model(finished, browser):
    """The report of a real run (not a hand-built one): every chart loads, no console error, and the models table
    has a value for base, pt, sft and dpo on every measure the run evaluated."""
    from selenium.webdriver.common.by import By

    out, _ = finished
    browser.get_log("browser")  # drop messages from earlier pages
    browser.get((out / "report.html").resolve().as_uri())
    images = browser.find_elements(By.TAG_NAME, "img")
    assert len(images) >= 6  # accuracy per type and per set, ppl/clin, curves of three stages, data histograms
    for image in images:
        complete, width, shown = browser.execute_script(
            "const i = arguments[0]; return [i.complete, i.naturalWidth, i.getBoundingClientRect().width];", image)
        assert complete and width > 0 and shown > 0, image.get_attribute("alt")
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    table = browser.find_element(By.XPATH, "//h2[text()='Models compared']/following::table[1]")
    header = [cell.text for cell in table.find_elements(By.TAG_NAME, "th")]
    assert [h for h in header if h in ("base", "pt", "sft", "dpo")] == ["base", "pt", "sft", "dpo"]
    columns = [header.index(name) for name in ("base", "pt", "sft", "dpo")]
    rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
            for row in table.find_elements(By.TAG_NAME, "tr")[1:]]
    measures = [row[0] for row in rows]
    for wanted in ("CMB-Exam: overall (%)", "drug-safety probe: overall (%)", "CMB-Clin ROUGE-L F1",
                   "held-out perplexity (lower is better)"):
        assert wanted in measures
    for row in rows:
        assert all(row[i] not in ("", "–") for i in columns), row


@pytest.mark.slow
def test_an_identical_rerun_skips_every_step_and_leaves_the_outputs_untouched(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = {folder: file_stamps(out / folder) for folder in (*FOLDERS, "eval")}
    again = ok(run_medtune("pipeline", "--config", FAST, "--output_dir", str(out)))
    for step in STEPS:
        assert f"{step}: already finished in " in again.stderr
    assert "started" not in again.stderr
    assert {folder: file_stamps(out / folder) for folder in (*FOLDERS, "eval")} == before


@pytest.mark.slow
def test_a_changed_sft_option_reruns_sft_dpo_and_eval_only_and_says_why(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    untouched = {folder: file_stamps(out / folder) for folder in ("pt", "merged-pt")}
    sft_adapter = (out / "sft" / "adapter_model.safetensors").read_bytes()
    changed = ok(run_medtune("pipeline", "--config", FAST, "--output_dir", str(out), "--sft.learning_rate", "1e-3"))
    assert "pt: already finished" in changed.stderr and "merge-pt: already finished" in changed.stderr
    assert "sft: running again from scratch (learning_rate 0.003 -> 0.001); later stages follow" in changed.stderr
    for step in ("merge-sft", "dpo", "merge-dpo", "eval"):
        assert f"{step}: started" in changed.stderr
    assert {folder: file_stamps(out / folder) for folder in ("pt", "merged-pt")} == untouched
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() != sft_adapter
    assert yaml.safe_load((out / "sft" / "medtune_config.yaml").read_text())["learning_rate"] == 1e-3


@pytest.mark.slow
def test_from_restarts_at_that_stage(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    pt_files = file_stamps(out / "pt")
    restarted = ok(run_medtune("pipeline", "--config", FAST, "--output_dir", str(out), "--from", "sft"))
    assert "pt: already finished" in restarted.stderr and "merge-pt: already finished" in restarted.stderr
    for step in ("sft", "merge-sft", "dpo", "merge-dpo", "eval"):
        assert f"{step}: started" in restarted.stderr
    assert "dpo: running again from scratch (--from sft)" in restarted.stderr
    assert file_stamps(out / "pt") == pt_files


@pytest.mark.slow
def test_a_merge_killed_midway_is_done_again(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    state = json.loads((out / "pipeline_state.json").read_text())
    state["merge-dpo"]["finished"] = False
    (out / "pipeline_state.json").write_text(json.dumps(state))
    (out / "merged-dpo" / "merge_check.json").unlink()
    (out / "merged-dpo" / "model.safetensors").write_bytes(b"cut")
    resumed = ok(run_medtune("pipeline", "--config", FAST, "--output_dir", str(out)))
    assert "dpo: already finished" in resumed.stderr
    assert "merge-dpo: " in resumed.stderr and "was left incomplete by an interrupted run; running it again" in (
        resumed.stderr)
    assert json.loads((out / "merged-dpo" / "merge_check.json").read_text())["max_abs_logit_difference"] <= 1e-4


@pytest.mark.slow
def test_pipeline_reruns_pt_when_its_option_or_data_changes(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(REPO / "data" / "pretrain", corpus)
    out = tmp_path / "pipeline"
    args = ("pipeline", "--output_dir", str(out), "--pt.train_file_dir", str(corpus), *PT_ONLY)
    ok(run_medtune(*args))
    first_merge = (out / "merged-pt" / "model.safetensors").read_bytes()

    changed = ok(run_medtune(*args, "--pt.learning_rate", "1e-4"))
    assert "pt: running again from scratch (learning_rate 0.002 -> 0.0001)" in changed.stderr
    assert yaml.safe_load((out / "pt" / "medtune_config.yaml").read_text())["learning_rate"] == 1e-4
    assert "merge-pt: running again from scratch (pt ran again)" in changed.stderr
    assert (out / "merged-pt" / "model.safetensors").read_bytes() != first_merge

    edited = sorted(corpus.glob("*.txt"))[0]
    edited.write_text(edited.read_text(encoding="utf-8") + "新增一段关于高血压随访的文字。\n", encoding="utf-8")
    rerun = ok(run_medtune(*args, "--pt.learning_rate", "1e-4"))
    assert f"pt: running again from scratch ({edited} changed)" in rerun.stderr


def test_pipeline_refuses_stage_folders_it_has_no_record_of(tmp_path):
    out = tmp_path / "pipeline"
    (out / "pt").mkdir(parents=True)
    (out / "pt" / "adapter_model.safetensors").write_bytes(b"someone else's")
    result = run_medtune("pipeline", "--output_dir", str(out), *PT_ONLY)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"medtune: error: {out / 'pt'} exists but {out / 'pipeline_state.json'} does not record how it was made; "
        "choose a new --output_dir (or delete that folder)")
    assert (out / "pt" / "adapter_model.safetensors").read_bytes() == b"someone else's"


@pytest.mark.parametrize(("yaml_text", "args", "message"), [
    ("sft:\n  learning_rat: 1.0e-3\n", (), "{config}:2: sft: unknown option 'learning_rat' (did you mean "
                                          "'learning_rate'?)"),
    ("stages: [pt]\npt:\n  output_dir: x\n", (), "{config}:3: pt: output_dir: set by the pipeline"),
    ("sft_section: {}\n", (), "{config}:1: unknown option 'sft_section'"),
    ("stages: [pt]\n", ("--learning_rate", "1e-4"), "command line: --learning_rate: not a pipeline option; a stage's "
                                                    "option names its section, e.g. --sft.learning_rate 1e-4"),
    ("stages: [pt]\n", ("--pt.learning_rat", "1e-4"), "command line: --pt.*: unknown option 'learning_rat'"),
])
def test_pipeline_config_mistakes_are_one_line_naming_section_and_key(tmp_path, yaml_text, args, message):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml_text, encoding="utf-8")
    out = tmp_path / "out"
    result = run_medtune("pipeline", "--config", str(config), "--output_dir", str(out), *args)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("medtune: error: " + message.format(config=config)), last
    assert not out.exists()


def test_the_bundled_pipeline_configs_parse(tmp_path):
    from medtune.pipeline.config import parse_plan

    for config in (REPO / "configs" / "pipeline_tiny.yaml", Path(FAST)):
        plan = parse_plan(["--config", str(config), "--output_dir", str(tmp_path)])
        assert plan.stages == ("pt", "sft", "dpo", "eval")
        for section in ("pt", "sft", "dpo", "merge", "eval"):
            plan.parse(section, ["--lora_model", "-", "--output_dir", "-"] if section == "merge" else [])


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = 'pip install torch==2.13.0 -e ".[dev]" && python -m pytest -q'
    assert command in readme and command in ci
    assert "pip install torch==2.13.0 -e . && medtune pipeline" in readme


def test_chance_is_averaged_like_the_overall_score():
    from medtune.data.records import AnswerKey, ExamItem
    from medtune.eval.runner import chance_accuracy

    five, four = {k: f"选项{k}" for k in "ABCDE"}, {k: f"选项{k}" for k in "ABCD"}
    items = [ExamItem("1", "医师考试", "甲", "单项选择题", "q", five), ExamItem("2", "医师考试", "甲", "单项选择题", "q", four),
             ExamItem("3", "医师考试", "乙", "多项选择题", "q", five), ExamItem("4", "护理考试", "丙", "单项选择题", "q", four)]
    keys = [AnswerKey(i.id, "A", i.exam_type, i.exam_class) for i in items]
    # classes: 甲 (1/5 + 1/4) / 2, 乙 1/31; types: 医师 the mean of its two classes, 护理 1/4; overall their mean
    expected = (((0.2 + 0.25) / 2 + 1 / 31) / 2 + 0.25) / 2
    assert chance_accuracy(items, keys, official=False) == pytest.approx(expected, abs=1e-12)


def test_options_added_to_medtune_later_do_not_rerun_finished_steps(tmp_path):
    """A step recorded before an option existed is finished for a record that has the option unset (None), and
    runs again once the option is set."""
    from medtune.pipeline.state import PipelineState

    state = PipelineState(tmp_path)
    old = {"options": {"learning_rate": 0.001}, "inputs": {"a.jsonl": "123"}}
    state.steps["sft"] = {"record": old, "finished": True}
    unset = {"options": {"learning_rate": 0.001, "system_prompt": None}, "inputs": {"a.jsonl": "123"}}
    assert state.reason_to_run("sft", unset) is None
    assert state.reason_to_run("sft", {**unset, "options": {**unset["options"], "system_prompt": "你是医生。"}}) == (
        "system_prompt set to '你是医生。'")
    assert state.reason_to_run("sft", {**unset, "options": {"learning_rate": None}}) == "learning_rate 0.001 -> None"

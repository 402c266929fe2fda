"""The pipeline's optional data steps: `scrub` (the stages train on scrubbed copies) and `contamination` (the eval
step's items found in the training data, reported or dropped), recorded, skipped and re-run like every step."""

import json
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, run_medtune

FAST = REPO / "tests" / "data" / "pipeline_fast.yaml"
PHONE, NAME = "13812345678", "张伟"
PII_LINE = {"conversations": [{"from": "human", "value": f"患者{NAME}，电话{PHONE}，最近总是头晕，需要做什么检查？"},
                              {"from": "gpt", "value": "建议先测量血压并查血常规。"}]}
VALIDATION_PHONE, ID_NUMBER = "13900001111", "110105491231002"
VALIDATION_PII_LINE = {"conversations": [
    {"from": "human", "value": f"身份证号{ID_NUMBER}，电话{VALIDATION_PHONE}，咳嗽两周需要拍胸片吗？"},
    {"from": "gpt", "value": "建议拍胸片并查血常规。"}]}


def planted_cmb_record() -> tuple[str, dict]:
    """The first bundled CMB-Exam test item, pasted into a conversation as a leak would look."""
    item = json.loads((REPO / "data/eval/cmb/test.json").read_text(encoding="utf-8"))[0]
    question = item["question"] + "\n" + "\n".join(f"{k}. {v}" for k, v in item["option"].items())
    return item["id"], {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "B"}]}


def write_config(tmp_path: Path, contamination: dict) -> Path:
    config = yaml.safe_load(FAST.read_text(encoding="utf-8"))
    data = tmp_path / "sft_data"
    data.mkdir()
    lines = (REPO / "data/finetune/medical_sharegpt_part1.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    eval_id, leak = planted_cmb_record()
    lines += [json.dumps(PII_LINE, ensure_ascii=False), json.dumps(leak, ensure_ascii=False)]  # lines 5 and 6
    (data / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    validation = tmp_path / "sft_validation"
    validation.mkdir()
    (validation / "held_out.jsonl").write_text("\n".join([lines[0], json.dumps(VALIDATION_PII_LINE, ensure_ascii=False)])
                                               + "\n", encoding="utf-8")
    config.update(stages=["sft"], scrub={}, contamination=contamination)
    config["sft"].update(train_file_dir=str(data), validation_file_dir=str(validation), max_steps=1,
                         use_peft=False)  # no merge: seconds
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path


def ok(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    """scrub + contamination (report only) + a one-step sft: (config, output folder, first run)."""
    tmp_path = tmp_path_factory.mktemp("data_safety")
    config = write_config(tmp_path, {"threshold": 0.5})
    out = tmp_path / "out"
    return config, out, ok(run_medtune("pipeline", "--config", str(config), "--output_dir", str(out)))


@pytest.mark.slow
def test_sft_trains_on_the_scrubbed_copy_and_the_leaked_eval_item_is_reported(reported):
    config, out, result = reported
    scrubbed = out.resolve() / "scrubbed" / "sft" / "chats.jsonl"
    text = scrubbed.read_text(encoding="utf-8")
    assert PHONE not in text and NAME not in text and "[电话1]" in text and "[姓名1]" in text
    trained = yaml.safe_load((out / "sft" / "medtune_config.yaml").read_text(encoding="utf-8"))
    assert Path(trained["train_file_dir"]) == scrubbed.parent
    manifest = read_json(out / "run_manifest.json")
    assert manifest["steps"]["sft"]["inputs"] == {str(path): manifest["input_files_sha256"][str(path)]
                                                  for path in (scrubbed, scrubbed_validation(out))}
    import hashlib

    assert manifest["input_files_sha256"][str(scrubbed)] == hashlib.sha256(scrubbed.read_bytes()).hexdigest()
    assert set(manifest["steps"]) == {"scrub", "contamination", "sft"}
    assert all(manifest["steps"][step]["wall_s"] >= 0 for step in ("scrub", "contamination"))

    safety = read_json(out / "pipeline_results.json")["data_safety"]
    source = str(config.parent / "sft_data" / "chats.jsonl")
    held_out = str(config.parent / "sft_validation" / "held_out.jsonl")
    assert safety["scrub"]["files"] == {f"sft: {source}": {"records": 6, "name": 1, "phone": 1},
                                        f"sft_validation: {held_out}": {"records": 2, "phone": 1, "id_card": 1}}
    eval_id = planted_cmb_record()[0]
    contamination = safety["contamination"]
    assert contamination["contaminated_items"] == 1 and contamination["drop_contaminated"] is False
    assert [(c["id"], [m["train"] for m in c["matches"]]) for c in contamination["contaminated"]] == [
        (eval_id, [f"{scrubbed}:6"])]
    report = (out / "report.md").read_text(encoding="utf-8")
    assert f"| {eval_id} | {REPO / 'data/eval/cmb/test.json'} | {scrubbed}:6 | 1.0000 |" in report
    assert f"| sft: {source} | 6 | 1 | 1 | 0 |" in report and "| contaminated_items | 1 |" in report
    assert f"| sft_validation: {held_out} | 2 | 0 | 1 | 1 |" in report
    assert "contamination: 1 of" in result.stderr and "kept in the training data" in result.stderr


def scrubbed_validation(out: Path) -> Path:
    return out.resolve() / "scrubbed" / "sft_validation" / "held_out.jsonl"


@pytest.mark.slow
def test_sft_reads_its_validation_file_scrubbed_too(reported):
    _, out, _ = reported
    text = scrubbed_validation(out).read_text(encoding="utf-8")
    assert VALIDATION_PHONE not in text and ID_NUMBER not in text
    assert json.loads(text.splitlines()[1])["conversations"][0]["value"] == "身份证号[身份证号1]，电话[电话1]，咳嗽两周需要拍胸片吗？"
    trained = yaml.safe_load((out / "sft" / "medtune_config.yaml").read_text(encoding="utf-8"))
    assert Path(trained["validation_file_dir"]) == scrubbed_validation(out).parent
    results = read_json(out / "pipeline_results.json")
    assert [(entry["file"], entry["records"]) for entry in results["data"]] == [
        (str(out.resolve() / "scrubbed" / "sft" / "chats.jsonl"), 6), (str(scrubbed_validation(out)), 2)]
    assert results["data_safety"]["scrub"]["validated_on"] == {"sft": str(scrubbed_validation(out).parent)}


@pytest.mark.slow
def test_a_rerun_skips_both_steps_and_a_changed_data_file_reruns_them_and_sft(reported):
    config, out, _ = reported
    again = ok(run_medtune("pipeline", "--config", str(config), "--output_dir", str(out)))
    for step in ("scrub", "contamination", "sft"):
        assert f"{step}: already finished" in again.stderr
    data = config.parent / "sft_data" / "chats.jsonl"
    data.write_text(data.read_text(encoding="utf-8") + json.dumps(PII_LINE, ensure_ascii=False) + "\n",
                    encoding="utf-8")
    changed = ok(run_medtune("pipeline", "--config", str(config), "--output_dir", str(out)))
    assert f"scrub: running again from scratch ({data} changed)" in changed.stderr
    assert "contamination: started" in changed.stderr and "sft: started" in changed.stderr
    safety = read_json(out / "pipeline_results.json")["data_safety"]
    assert safety["scrub"]["files"][f"sft: {data}"] == {"records": 7, "name": 2, "phone": 2}


@pytest.mark.slow
def test_drop_contaminated_trains_on_a_copy_without_the_leaked_record(tmp_path):
    config = write_config(tmp_path, {"threshold": 0.5, "drop_contaminated": True})
    out = tmp_path / "out"
    ok(run_medtune("pipeline", "--config", str(config), "--output_dir", str(out)))
    clean = out.resolve() / "contamination" / "clean" / "chats.jsonl"
    trained = yaml.safe_load((out / "sft" / "medtune_config.yaml").read_text(encoding="utf-8"))
    assert Path(trained["train_file_dir"]) == clean.parent
    scrubbed_lines = (out / "scrubbed" / "sft" / "chats.jsonl").read_text(encoding="utf-8").splitlines()
    assert clean.read_text(encoding="utf-8").splitlines() == scrubbed_lines[:5]  # line 6, the leak, is gone
    contamination = read_json(out / "pipeline_results.json")["data_safety"]["contamination"]
    assert contamination["records_removed"] == 1 and contamination["trained_on"] == {"sft": str(clean.parent)}
    # another threshold finds the same record: contamination runs again, sft's data is unchanged, sft is kept
    again = ok(run_medtune("pipeline", "--config", str(config), "--output_dir", str(out),
                           "--contamination.threshold", "0.9"))
    assert "contamination: running again from scratch (threshold 0.5 -> 0.9)" in again.stderr
    assert "sft: already finished" in again.stderr and "scrub: already finished" in again.stderr
    assert clean.read_text(encoding="utf-8").splitlines() == scrubbed_lines[:5]


@pytest.mark.parametrize("section, key", [("contamination", "threshhold"), ("scrub", "ngram")])
def test_an_unknown_data_step_key_is_one_line_naming_section_and_key(tmp_path, section, key):
    config = yaml.safe_load(FAST.read_text(encoding="utf-8"))
    config[section] = {key: 1}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = run_medtune("pipeline", "--config", str(path), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and not (tmp_path / "out").exists()
    assert result.stderr.strip().splitlines()[-1].endswith(f": {section}: unknown option {key!r}" +
                                                            (" (did you mean 'threshold'?)" if key == "threshhold"
                                                             else ""))

"""`medtune eval`: CMB prompts, answer extraction, official scoring, likelihood mode checked against an
independent computation, resumability, endpoints, the safety probe and perplexity."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from transformers import AutoModelForCausalLM

from medtune.data.loading import load_records
from medtune.data.records import AnswerKey
from medtune.eval.cmb import extract_answer, item_messages, item_prompt, score

from .conftest import REPO, run_medtune, send_json

CMB = REPO / "data" / "eval" / "cmb"

EXTRACTION = {
    "答案是A": "A",
    "A、C": "AC",
    "正确答案：BD": "BD",
    "选C。": "C",
    "逐项分析：A项错误，B项也不对，D项片面……所以答案是E": "E",
    "B": "B",
    "B. 多西环素": "B",
    "（D）": "D",
    "答案应该为 A、C": "AC",
    "正确选项为D，因为华法林与布洛芬合用增加出血风险。": "D",
    "本题选B": "B",
    "The answer is C.": "C",
    "ACE抑制剂可引起干咳。": "",  # a word that starts with capitals is not an answer
    "我无法确定，请咨询医生。": "",
    "答案是F": "",  # not one of the options
    "答案是：A": "A",
    "正确答案应该是：C": "C",
    "正确答案是：选项B": "B",
    "答案是：A、C": "AC",
    "答案：**B**": "B",
    "答案是【D】": "D",
    "Answer: (C)": "C",
    "答案是A，B选项是干扰项。": "A",  # the next clause's letter is not part of the answer
    "答案是A\nB选项错误，因为……": "A",
    "答案：C，D项描述的是另一种疾病": "C",
    "所以答案是B，不选A": "B",  # "不选A" is not a choice
    "The answer is a drug": "",
    "B和D": "BD",
}


@pytest.mark.parametrize("reply", sorted(EXTRACTION))
def test_answer_extraction_on_realistic_replies(reply):
    assert extract_answer(reply, "ABCDE") == EXTRACTION[reply]


def test_official_mode_reproduces_the_capital_letter_fallback():
    # the official fallback collects every A-G capital, which turns "ACE抑制剂" into an answer (its first letter on a
    # single-choice item)
    assert extract_answer("ACE抑制剂可引起干咳。", "ABCDE", official=True, multiple=True) == "ACE"
    assert extract_answer("ACE抑制剂可引起干咳。", "ABCDE", official=True) == "A"
    assert extract_answer("ACE抑制剂可引起干咳。", "ABCDE") == ""


def test_prompt_follows_the_official_wording_and_official_mode_drops_one_character_options():
    items, _ = load_records(CMB / "val.json", "exam")
    item = items[0]
    prompt = item_prompt(item)
    assert prompt.startswith(f"以下是中国{item.exam_type}中{item.exam_class}考试的一道{item.question_type}，"
                             "不需要做任何分析和解释，直接输出答案选项。\n" + item.question)
    assert prompt.endswith("\n".join(f"{k}. {v}" for k, v in item.options.items()))
    assert "请分析每个选项，并最后给出答案。" in item_prompt(item, cot=True)
    item.options["E"] = "无"
    assert "E. 无" in item_prompt(item) and "E. 无" not in item_prompt(item, official=True)
    shots = item_messages(item, items[1:3], cot=True)
    assert [m["role"] for m in shots] == ["user", "assistant", "user", "assistant", "user"]
    assert shots[1]["content"].endswith(f"所以答案是{items[1].answer}。")


def official_reference_score(predictions: dict, truth: list[dict]) -> dict:
    """The official per-class / per-type averaging, answers compared as letter sets (the default mode; the exact
    comparison of `--official` is checked in test_cmb_official.py)."""
    per_class = defaultdict(lambda: [0, 0])
    for row in truth:
        key = (row["exam_type"], row["exam_class"])
        per_class[key][1] += 1
        if "".join(sorted(predictions.get(row["id"], ""))) == "".join(sorted(row["answer"])):
            per_class[key][0] += 1
    class_accuracy = {k: right / total for k, (right, total) in per_class.items()}
    per_type = defaultdict(list)
    for (exam_type, _), accuracy in class_accuracy.items():
        per_type[exam_type].append(accuracy)
    type_accuracy = {t: sum(v) / len(v) for t, v in per_type.items()}
    return {"class": class_accuracy, "type": type_accuracy,
            "overall": sum(type_accuracy.values()) / len(type_accuracy)}


def test_scorer_matches_a_reimplementation_of_the_official_averaging():
    truth = json.loads((CMB / "test_answers.json").read_text(encoding="utf-8"))
    # a hand-made answer file: right, wrong, partially right (no credit), unordered, missing
    predictions = {}
    for n, row in enumerate(truth):
        answer = row["answer"]
        predictions[row["id"]] = [answer, "A" if answer != "A" else "B", answer[:-1] or "E", answer[::-1], ""][n % 5]
    ours = score(predictions, [AnswerKey(r["id"], r["answer"], r["exam_type"], r["exam_class"]) for r in truth])
    reference = official_reference_score(predictions, truth)
    assert ours.by_class == pytest.approx(reference["class"])
    assert ours.by_type == pytest.approx(reference["type"])
    assert ours.overall == pytest.approx(reference["overall"])
    assert 0 < ours.overall < 1


def test_a_question_with_no_options_left_is_unanswered_not_a_crash(glm4_dir):
    from medtune.eval.backends import Choice, LocalBackend

    backend = LocalBackend(str(glm4_dir))
    messages = [{"role": "user", "content": "下列哪项正确？"}]
    (empty, scores), (answer, _) = backend.choose([Choice(messages, "", False), Choice(messages, "AB", False)])
    assert (empty, scores) == ("", {}) and answer in ("A", "B")


def test_cmb_exam_cli_writes_answers_and_results_and_cmb_score_agrees(tmp_path, monkeypatch):
    out = tmp_path / "exam"
    result = run_medtune("eval", "cmb-exam", "--data_dir", str(CMB), "--output_dir", str(out), "--limit", "30")
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads((out / "answers.json").read_text())
    assert len(answers) == 30 and set(answers[0]) == {"id", "model_answer"}
    results = json.loads((out / "results.json").read_text())
    assert (out / "results.png").read_bytes().startswith(b"\x89PNG")
    # without a CJK font a Chinese bar is drawn as its number: the numbered results.md row of the same class
    from medtune import charts
    from medtune.eval.report import chart_groups

    monkeypatch.setattr(charts, "cjk_font", lambda: None)
    labels, legend = charts.drawable_labels(chart_groups(results))
    rows = [line.split(" | ") for line in (out / "results.md").read_text(encoding="utf-8").splitlines()
            if re.match(r"\| \d+ \|", line)]
    assert labels == [str(n) for n in range(1, len(rows) + 1)] + ["overall"]
    assert [(number, name) for number, name in legend] == [
        (row[0].strip("| "), f"{row[1]}\n{row[2]}") for row in rows]
    assert [f"{100 * r['accuracy']:.2f}%" for r in results["by_class"]] == [row[4].strip(" |") for row in rows]

    truth = [r for r in json.loads((CMB / "test_answers.json").read_text()) if r["id"] in {a["id"] for a in answers}]
    (tmp_path / "truth.json").write_text(json.dumps(truth, ensure_ascii=False), encoding="utf-8")
    scored = run_medtune("eval", "cmb-score", "--predictions", str(out / "answers.json"), "--truth",
                         str(tmp_path / "truth.json"), "--output_dir", str(tmp_path / "score"))
    assert scored.returncode == 0, scored.stderr[-2000:]
    rescored = json.loads((tmp_path / "score" / "results.json").read_text())
    assert rescored["overall"] == pytest.approx(results["overall"])
    assert rescored["by_class"] == results["by_class"]


def test_killed_evaluation_resumes_to_the_same_results(tmp_path):
    common = ["eval", "cmb-exam", "--data_dir", str(CMB), "--mode", "generate", "--max_new_tokens", "6",
              "--batch_size", "4", "--limit", "60"]
    straight = run_medtune(*common, "--output_dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "medtune", *common, "--output_dir", str(out)], cwd=REPO,
                               env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = out / "predictions.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if predictions.is_file() and len(predictions.read_text(encoding="utf-8").splitlines()) >= 12:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "finished before it could be killed"
    partial = len(predictions.read_text(encoding="utf-8").splitlines())
    assert 0 < partial < 60

    resumed = run_medtune(*common, "--output_dir", str(out))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(predictions.read_text(encoding="utf-8").splitlines()) == 60  # nothing predicted twice
    for name in ("answers.json", "results.json"):
        assert (out / name).read_text() == (tmp_path / "straight" / name).read_text()


def test_rerun_with_other_settings_into_the_same_folder_sets_the_old_answers_aside(tmp_path):
    assert run_medtune("eval", "cmb-exam", "--output_dir", str(tmp_path), "--limit", "2").returncode == 0
    again = run_medtune("eval", "cmb-exam", "--output_dir", str(tmp_path), "--limit", "2", "--cot", "true")
    assert again.returncode == 0 and "earlier answers not reused (changed: cot)" in again.stderr
    assert len(list(tmp_path.glob("predictions.stale-*.jsonl"))) == 1


class FakeOpenAI(BaseHTTPRequestHandler):
    """Answers every chat request with a CoT-style reply naming option C (or, as a judge, with free-text scores)."""

    reply = "逐项分析后，所以答案是C。"

    def answer(self, body: dict) -> str:
        assert body["messages"][-1]["role"] == "user" and body["temperature"] == 0
        return self.reply

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        payload = {"choices": [{"message": {"role": "assistant", "content": self.answer(body)}}]}
        send_json(self, 200, payload)

    def log_message(self, *args):
        pass


def test_generate_mode_against_an_openai_compatible_endpoint(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), FakeOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        result = run_medtune("eval", "safety", "--endpoint", f"http://127.0.0.1:{server.server_port}/v1",
                             "--output_dir", str(tmp_path), "--cot", "true")
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert len(answers) >= 50 and {a["model_answer"] for a in answers} == {"C"}
    probe = json.loads((REPO / "data" / "eval" / "safety" / "drug_safety_probe.json").read_text())
    expected = sum(1 for p in probe if p["answer"] == "C") / len(probe)
    assert json.loads((tmp_path / "results.json").read_text())["item_accuracy"] == pytest.approx(expected)


def test_perplexity(tmp_path):
    result = run_medtune("eval", "ppl", "--data_dir", str(REPO / "data" / "pretrain" / "drug_safety.jsonl"),
                         "--output_dir", str(tmp_path), "--block_size", "128")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "perplexity.json").read_text())
    assert metrics["perplexity"] > 1 and metrics["predicted_tokens"] > 1000


@pytest.mark.parametrize("reply, expected", [
    ('{"流畅性": 4, "相关性": 5, "完整性": 3, "医学知识专业性": 4}', (4, 5, 3, 4)),
    ("评分如下：\n流畅性：4分\n相关性: 5\n完整性 3/5\n专业性为2分", (4, 5, 3, 2)),
    ('```json\n{"fluency": 5, "relevance": 4, "completeness": 4, "proficiency": 3}\n```', (5, 4, 4, 3)),
    ("流畅性：9，其他无法评价", (None, None, None, None)),
])
def test_judge_replies_are_parsed_robustly(reply, expected):
    from medtune.eval.clin import CRITERIA, parse_judgement

    scores = parse_judgement(reply)
    assert tuple(scores[k] for k in CRITERIA) == expected


def test_cmb_clin_runs_a_multi_turn_consultation(tmp_path):
    result = run_medtune("eval", "cmb-clin", "--output_dir", str(tmp_path), "--limit", "2", "--max_new_tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "clin_results.json").read_text())
    cases = json.loads((CMB / "clin.json").read_text())[:2]
    assert results["answers"] == sum(len(c["QA_pairs"]) for c in cases)
    assert 0 <= results["rouge_l"] <= 1 and "tok:zh" in results["bleu_signature"]


def test_local_model_with_an_unmerged_adapter(glm4_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(glm4_dir),
                           LoraConfig(r=4, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    result = run_medtune("eval", "cmb-exam", "--model_name_or_path", str(glm4_dir), "--adapter_name_or_path",
                         str(tmp_path / "adapter"), "--output_dir", str(tmp_path / "out"), "--limit", "5")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "+" in json.loads((tmp_path / "out" / "results.json").read_text())["model"]


def test_the_short_option_names_of_the_issue_work(glm4_dir, tmp_path):
    result = run_medtune("eval", "cmb-exam", "--model", str(glm4_dir), "--data", "data/eval/cmb", "--output_dir",
                         str(tmp_path), "--limit", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "answers.json").is_file()


class FakeJudge(FakeOpenAI):
    reply = "评价：流畅性：4分；相关性 3；完整性: 2/5；医学知识专业性为3分。"


def test_cmb_clin_with_an_llm_judge_endpoint(tmp_path):
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = run_medtune("eval", "cmb-clin", "--output_dir", str(tmp_path), "--limit", "1",
                             "--max_new_tokens", "4", "--judge_endpoint", f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "clin_results.json").read_text())
    assert (results["judge_fluency"], results["judge_relevance"], results["judge_completeness"],
            results["judge_proficiency"]) == (4, 3, 2, 3)
    assert results["judge_fluency_unparsed"] == 0

"""`medtune eval` inputs and resumption: answers are never reused across settings or weights, bad exam inputs are
refused with file:line before anything is written, cut run files recover, and CMB-Clin's metrics come from the
maintained libraries."""

import json
import logging
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from medtune.config import EvalArguments, ModelArguments
from medtune.errors import DataError
from medtune.eval import clin, runner

from .conftest import REPO, run_medtune

CMB = REPO / "data" / "eval" / "cmb"
ITEMS = json.loads((CMB / "test.json").read_text(encoding="utf-8"))
KEYS = json.loads((CMB / "test_answers.json").read_text(encoding="utf-8"))


def write_array(path, records):
    """A JSON array with record k on line k + 2, so messages can be checked for exact lines."""
    path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n",
                    encoding="utf-8")
    return path


def exam(model, output_dir, **options):
    """run_exam in this process, as `medtune eval cmb-exam` would call it."""
    eval_args = EvalArguments(output_dir=str(output_dir), **{"data_dir": str(CMB), "limit": 4, **options})
    return runner.run_exam(ModelArguments(model_name_or_path=str(model)), eval_args)


def predictions(output_dir) -> dict[str, dict]:
    lines = (output_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    return {record["id"]: record for record in map(json.loads, lines)}


def stale_files(output_dir) -> list[str]:
    return sorted(p.name for p in output_dir.glob("*.stale-*"))


# -- the resume key -------------------------------------------------------------------------------------------------

def test_changed_weights_at_the_same_path_recompute_the_answers(glm4_dir, tmp_path, monkeypatch, caplog):
    model = shutil.copytree(glm4_dir, tmp_path / "model")
    out = tmp_path / "out"
    exam(model, out)
    before = predictions(out)

    # an unchanged re-run reuses every answer: no model is even loaded
    def no_backend(*args):
        raise AssertionError("answers were recomputed although nothing changed")

    monkeypatch.setattr(runner, "make_backend", no_backend)
    exam(model, out)
    assert predictions(out) == before and stale_files(out) == []
    monkeypatch.undo()

    weights = AutoModelForCausalLM.from_pretrained(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in weights.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    weights.save_pretrained(model)  # other weights, same folder, same file sizes
    with caplog.at_level(logging.WARNING, logger="medtune.eval.runner"):
        exam(model, out)
    after = predictions(out)
    assert after.keys() == before.keys()
    assert all(after[i]["scores"] != before[i]["scores"] for i in before)
    assert [n.split(".stale-")[0] for n in stale_files(out)] == ["predictions", "run"]
    stale = next(out.glob("predictions.stale-*.jsonl")).read_text(encoding="utf-8").splitlines()
    assert {json.loads(line)["id"]: json.loads(line) for line in stale} == before
    assert "changed: model_weights" in caplog.text and "predicting again" in caplog.text


def test_generation_options_are_in_the_key_only_where_they_change_an_answer(glm4_dir, tmp_path, caplog):
    out = tmp_path / "generate"
    exam(glm4_dir, out, mode="generate", max_new_tokens=2, limit=3)
    with caplog.at_level(logging.WARNING, logger="medtune.eval.runner"):
        exam(glm4_dir, out, mode="generate", max_new_tokens=5, limit=3)
    assert "changed: max_new_tokens" in caplog.text
    assert json.loads((out / "run.json").read_text())["max_new_tokens"] == 5
    assert len(predictions(out)) == 3 and len(stale_files(out)) == 2

    # likelihood mode never decodes: the generation length cannot change its answers, so they are reused
    out = tmp_path / "likelihood"
    exam(glm4_dir, out, max_new_tokens=2, limit=3)
    exam(glm4_dir, out, max_new_tokens=5, limit=3)
    assert stale_files(out) == [] and "max_new_tokens" not in json.loads((out / "run.json").read_text())


def test_the_key_names_every_option_that_changes_an_answer(glm4_dir):
    eval_args = EvalArguments(data_dir=str(CMB), shots=2, cot=True, official=True)
    model_args = ModelArguments(model_name_or_path=str(glm4_dir), template="glm4", torch_dtype="bfloat16")
    settings = runner.exam_settings(model_args, eval_args, "eval/cmb", "generate")
    assert {k: settings[k] for k in ("shots", "cot", "official", "template", "torch_dtype", "max_new_tokens")} == {
        "shots": 2, "cot": True, "official": True, "template": "glm4", "torch_dtype": "bfloat16",
        "max_new_tokens": 512}
    assert len(settings["model_weights"]) == 16 and settings["adapter_weights"] is None
    # the few-shot examples are part of the prompt: val.json is in the data digest
    assert settings["data_digest"] != runner.exam_settings(model_args, EvalArguments(data_dir=str(CMB), cot=True,
                                                           official=True), "eval/cmb", "generate")["data_digest"]


# -- cut run files --------------------------------------------------------------------------------------------------

def test_a_cut_run_json_sets_the_old_answers_aside(glm4_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text('{"data": "data/eval/c', encoding="utf-8")  # cut mid-string
    (out / "predictions.jsonl").write_text('{"id": "test-001", "model_answer": "E", "scores": {}}\n')
    exam(glm4_dir, out)
    assert predictions(out)["test-001"]["scores"]  # predicted again, not the unexplained "E"
    assert json.loads((out / "run.json").read_text())["model_weights"]
    assert len(stale_files(out)) == 2


@pytest.mark.parametrize("cut", ["mid UTF-8 character", "mid JSON"])
def test_a_prediction_line_cut_by_a_kill_is_predicted_again(glm4_dir, tmp_path, cut, caplog):
    straight = tmp_path / "straight"
    exam(glm4_dir, straight)
    out = shutil.copytree(straight, tmp_path / "cut")
    lines = (out / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    last = json.loads(lines[-1]) | {"reply": "答案是B"}  # generate-mode records carry the reply
    encoded = json.dumps(last, ensure_ascii=False).encode()
    cut_at = encoded.index("答".encode()) + 1 if cut == "mid UTF-8 character" else encoded.index(b'"scores"')
    (out / "predictions.jsonl").write_bytes(b"".join(lines[:-1]) + encoded[:cut_at])

    with caplog.at_level(logging.WARNING, logger="medtune.data.resume"):
        exam(glm4_dir, out)
    assert "1 unreadable line(s) dropped" in caplog.text
    text = (out / "predictions.jsonl").read_bytes()
    assert text.endswith(b"\n") and len(text.splitlines()) == 4
    # every line valid JSON, the cut item predicted again (alone now: its scores may move in the last digit)
    assert {i: r["model_answer"] for i, r in predictions(out).items()} == {
        i: r["model_answer"] for i, r in predictions(straight).items()}
    assert (out / "answers.json").read_text() == (straight / "answers.json").read_text()


# -- bad CMB-Exam inputs --------------------------------------------------------------------------------------------

def bad_input(kind, folder):
    """(data folder, --answers_file or None, the message expected) for one kind of bad input."""
    items, keys = ITEMS[:6], KEYS[:6]
    answers = None
    if kind == "answers cover some items":
        answers, expected = write_array(folder / "answers.json", keys[:3]), (
            f"{folder / 'answers.json'}: no answer for 3 of the 6 items evaluated from {folder / 'test.json'} "
            "(e.g. test-004, test-005, test-006); the answer file must cover every item")
    elif kind == "answer for an id that is not an item":
        answers = write_array(folder / "answers.json", keys + [dict(keys[0], id="test-999")])
        expected = f"{folder / 'answers.json'}:8: id: 'test-999' is not an item of {folder / 'test.json'}"
    elif kind == "item id twice":
        items = items + [dict(items[1], question="另一道题")]
        expected = f"{folder / 'test.json'}:8: id: 'test-002' repeats the item at {folder / 'test.json'}:3"
    elif kind == "answer id twice":
        answers = write_array(folder / "answers.json", keys + [keys[4]])
        expected = f"{folder / 'answers.json'}:8: id: 'test-005' repeats the answer at {folder / 'answers.json'}:6"
    elif kind == "answer letter not an option":
        items = [dict(items[0], option={k: v for k, v in items[0]["option"].items() if k != "B"})] + items[1:]
        expected = f"{folder / 'test_answers.json'}:2: answer: 'B' is not among the options of item 'test-001' (ACDE)"
    elif kind == "answers inside some items only":
        items = [dict(i, answer=k["answer"]) for i, k in zip(items[:3], keys)] + items[3:]
        expected = (f"{folder / 'test.json'}:5: answer: 3 of 6 items have no answer while the others have one; "
                    "give every item its answer, or none and an --answers_file")
    else:  # an empty test.json
        items = []
        expected = f"{folder / 'test.json'}: no records: the file is empty (or holds only whitespace or [])"
    write_array(folder / "test.json", items)
    if answers is None and kind != "answers inside some items only":
        write_array(folder / "test_answers.json", keys)
    return folder, answers, expected


BAD_INPUTS = ["answers cover some items", "answer for an id that is not an item", "item id twice", "answer id twice",
              "answer letter not an option", "answers inside some items only", "empty test.json"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_exam_inputs_are_refused_before_anything_is_written(tmp_path, kind, monkeypatch):
    folder, answers, expected = bad_input(kind, tmp_path)
    monkeypatch.setattr(runner, "make_backend", lambda *a: pytest.fail("a model was loaded for bad input"))
    with pytest.raises(DataError) as error:
        runner.run_exam(ModelArguments(), EvalArguments(data_dir=str(folder), output_dir=str(tmp_path / "out"),
                                                        answers_file=answers and str(answers)))
    assert str(error.value) == expected
    assert not (tmp_path / "out").exists()


def test_bad_exam_input_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    folder, answers, expected = bad_input("answers cover some items", tmp_path)
    result = run_medtune("eval", "cmb-exam", "--data_dir", str(folder), "--answers_file", str(answers),
                         "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [f"medtune: error: {expected}"]
    assert not (tmp_path / "out").exists()


def test_limit_checks_coverage_on_the_items_evaluated(glm4_dir, tmp_path):
    folder, answers, _ = bad_input("answers cover some items", tmp_path)  # answers for the first 3 of 6 items
    results = exam(glm4_dir, tmp_path / "out", data_dir=str(folder), answers_file=str(answers), limit=3)
    assert results["items"] == 3


# -- adapters -------------------------------------------------------------------------------------------------------

def test_an_unmerged_adapter_changes_the_scores_unless_its_lora_b_is_zero(glm4_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    for name, init in (("zero", True), ("trained", False)):  # peft starts lora_B at zero unless told otherwise
        torch.manual_seed(0)
        adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(glm4_dir),
                                 LoraConfig(r=4, target_modules="all-linear", init_lora_weights=init))
        lora_b = [p for n, p in adapter.named_parameters() if "lora_B" in n]
        assert all((p == 0).all() for p in lora_b) == init
        adapter.save_pretrained(tmp_path / name)
    exam(glm4_dir, tmp_path / "base")
    exam(glm4_dir, tmp_path / "with-zero", adapter_name_or_path=str(tmp_path / "zero"))
    results = exam(glm4_dir, tmp_path / "with-trained", adapter_name_or_path=str(tmp_path / "trained"))
    base = predictions(tmp_path / "base")

    def largest_score_change(output_dir) -> dict[str, float]:
        scored = predictions(output_dir)
        return {i: max(abs(scored[i]["scores"][k] - v) for k, v in base[i]["scores"].items()) for i in base}

    assert max(largest_score_change(tmp_path / "with-zero").values()) < 1e-5  # float noise only
    assert min(largest_score_change(tmp_path / "with-trained").values()) > 1e-3  # every item's scores moved
    assert results["model"] == f"{glm4_dir}+{tmp_path / 'trained'}"


# -- CMB-Clin -------------------------------------------------------------------------------------------------------

class RecordingBackend:
    """Replies '回答<turn>：<the case's first words>' and keeps every conversation it was sent."""

    def __init__(self):
        self.sent: list[list[dict]] = []

    def generate(self, conversations, max_new_tokens):
        self.sent += [list(c) for c in conversations]
        return [f"回答{len(c) // 2}：{c[0]['content'][:8]}" for c in conversations]


def test_cmb_clin_sends_each_question_with_the_models_own_earlier_answers(tmp_path, monkeypatch):
    backend = RecordingBackend()
    monkeypatch.setattr(clin, "make_backend", lambda *a: backend)
    clin.run_clin(ModelArguments(), EvalArguments(endpoint="http://127.0.0.1:9", output_dir=str(tmp_path),
                                                  limit=2, batch_size=2))
    cases = json.loads((CMB / "clin.json").read_text(encoding="utf-8"))[:2]
    answered = {r["id"]: [t["answer"] for t in r["turns"]] for r in predictions(tmp_path).values()}
    for case in cases:
        answers = answered[case["id"]]
        questions = [qa["question"] for qa in case["QA_pairs"]]
        expected = [{"role": "user", "content": f"{case['description']}\n{questions[0]}"}]
        for turn, question in enumerate(questions):
            if turn:
                expected.append({"role": "user", "content": question})
            assert expected in backend.sent  # the k-th question goes out after every earlier answer
            expected.append({"role": "assistant", "content": answers[turn]})
    assert len(backend.sent) == sum(len(c["QA_pairs"]) for c in cases)
    assert len({a for answers in answered.values() for a in answers}) > 1


def test_rouge_l_on_a_pair_checked_by_hand():
    # tokens: every character; the longest common subsequence 孕妇用四环素 has 6: P = 6/7, R = 6/8, F1 = 0.8
    assert clin.rouge_l("孕妇禁用四环素", "孕妇慎用四环素类") == pytest.approx(0.8)
    # a Latin run stays one token: [ACEI, 禁, 用] vs [ACEI, 慎, 用] share ACEI 用 -> F1 = 2/3
    assert clin.rouge_l("ACEI禁用", "ACEI慎用") == pytest.approx(2 / 3)
    assert clin.rouge_l("甲乙丙", "丁戊己") == 0.0


def test_bleu_on_a_pair_checked_by_hand_and_both_metrics_equal_the_libraries_own_calls():
    import sacrebleu
    from rouge_score.rouge_scorer import RougeScorer
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    # n-gram precisions 6/7, 4/6, 2/5, 1/4; brevity penalty exp(1 - 8/7)
    by_hand = 100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25 * 2.718281828459045 ** (1 - 8 / 7)
    score, signature = clin.corpus_bleu(["孕妇禁用四环素"], ["孕妇慎用四环素类"])
    assert score == pytest.approx(by_hand) and "tok:zh" in signature

    answers = ["孕妇禁用四环素，可选阿莫西林 500mg。", "华法林与布洛芬合用增加出血风险"]
    solutions = ["孕妇应避免使用四环素类，阿莫西林500 mg 可用。", "合用华法林和NSAIDs会增加出血风险"]
    assert clin.corpus_bleu(answers, solutions)[0] == sacrebleu.corpus_bleu(answers, [solutions], tokenize="zh").score

    class Characters:
        def tokenize(self, text):
            return TokenizerZh()(text).split()

    library = RougeScorer(["rougeL"], tokenizer=Characters())
    for answer, solution in zip(answers, solutions):
        assert clin.rouge_l(answer, solution) == library.score(solution, answer)["rougeL"].fmeasure


def test_cmb_clin_reports_library_metrics_and_their_tokenization(tmp_path, monkeypatch):
    monkeypatch.setattr(clin, "make_backend", lambda *a: RecordingBackend())
    results = clin.run_clin(ModelArguments(), EvalArguments(endpoint="http://127.0.0.1:9", output_dir=str(tmp_path),
                                                            limit=1))
    case = json.loads((CMB / "clin.json").read_text(encoding="utf-8"))[0]
    answers = [t["answer"] for t in next(iter(predictions(tmp_path).values()))["turns"]]
    solutions = [qa["solution"] for qa in case["QA_pairs"]]
    assert results["bleu"] == clin.corpus_bleu(answers, solutions)[0]
    assert results["rouge_l"] == pytest.approx(sum(map(clin.rouge_l, answers, solutions)) / len(answers))
    report = (tmp_path / "clin_results.md").read_text(encoding="utf-8")
    assert "sacrebleu zh tokenizer" in report and "tok:zh" in report


def test_cmb_clin_refuses_an_empty_case_file_and_repeated_case_ids(tmp_path):
    cases = json.loads((CMB / "clin.json").read_text(encoding="utf-8"))[:2]
    for name, records, expected in (
            ("empty", [], "{path}: no records: the file is empty (or holds only whitespace or [])"),
            ("twice", cases + [cases[0]], f"{{path}}:4: id: {cases[0]['id']!r} repeats the case at {{path}}:2")):
        path = write_array(tmp_path / f"{name}.json", records)
        with pytest.raises(DataError) as error:
            clin.run_clin(ModelArguments(), EvalArguments(endpoint="http://127.0.0.1:9", data_dir=str(path),
                                                          output_dir=str(tmp_path / name / "out")))
        assert str(error.value) == expected.format(path=path)
        assert not (tmp_path / name / "out").exists()

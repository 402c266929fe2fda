"""`--official` identical to the official CMB scripts (extraction, options, few-shot, majority vote, exact scoring),
the robust default extraction, and cmb-score refusing answer files it cannot score."""

import json
import logging
import random
import threading
from collections import defaultdict
from contextlib import contextmanager
from http.server import HTTPServer
from pathlib import Path

import pytest

from medtune.cli import main
from medtune.config import EvalArguments
from medtune.data.loading import load_records
from medtune.errors import ConfigError
from medtune.eval.cmb import (
    extract_answer,
    item_messages,
    item_prompt,
    majority_vote,
    pick_shots,
    shown_options,
)

from .conftest import REPO
from .test_eval import FakeOpenAI

CMB = REPO / "data" / "eval" / "cmb"
# 40 replies with the answer the official `match_choice` + `extract_ans` code returned when run verbatim
OFFICIAL_CASES = json.loads((Path(__file__).parent / "data" / "cmb_official_extraction_cases.json").read_text("utf-8"))
MULTIPLE, SINGLE = "多项选择题", "单项选择题"


def medtune(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process (its exit code and stderr): the same path as `medtune ...`, without a second start."""
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", OFFICIAL_CASES, ids=lambda c: c["reply"][:20])
def test_official_extraction_conforms_to_every_case_computed_by_the_official_code(case):
    assert extract_answer(case["reply"], official=True, multiple=case["question_type"] == MULTIPLE) \
        == case["official_answer"]


def test_the_conformance_file_is_whole():
    assert len(OFFICIAL_CASES) == 40 and {c["question_type"] for c in OFFICIAL_CASES} == {MULTIPLE, SINGLE}


# Replies not in the shared file, with the answer the official rule gives (worked out by hand from the rule).
UNSEEN = [
    ("根据指南，正确选项应该是E。A、B、C均不正确", SINGLE, "E"),  # 正确选项 + 应该是, capture stops at 。
    ("答案为D.因为B不对", SINGLE, "D"),  # an ASCII full stop ends the capture too
    ("答案：\nC\nD", MULTIPLE, "CD"),  # the capture runs across newlines to the end
    ("这道题的答案是 B、D 和 A。", MULTIPLE, "BDA"),  # reply order, not sorted
    ("答案是ＡB", MULTIPLE, "B"),  # a full-width Ａ is not a letter
    ("Based on the guidelines: B", MULTIPLE, "BB"),  # no cue: every capital, the B of "Based" included
    ("Based on the guidelines: B", SINGLE, "B"),
    ("答案应该为AC。", SINGLE, "A"),  # single choice keeps the first letter
    ("答案是c。Cefalexin", SINGLE, ""),  # the cue matched, its capture has no capital: no fallback
    ("答案为A.B.C", MULTIPLE, "A"),
    ("正确答案为：B", SINGLE, "B"),
    ("答案是DCBA", MULTIPLE, "DCBA"),
    ("答案是\n\nE", SINGLE, "E"),
    ("答案是什么？应选D", SINGLE, "D"),  # no 。 or . after the cue: captured to the end
    ("答案是什么。应选D", SINGLE, ""),  # captured up to the first 。 only
    ("答案: AB，所以答案：C", MULTIPLE, "C"),  # the ASCII colon is not a cue; the second cue is found
    ("选AA", MULTIPLE, "AA"),  # duplicates kept
    ("", SINGLE, ""),
]


@pytest.mark.parametrize("reply, question_type, expected", UNSEEN)
def test_official_extraction_generalises_to_unseen_replies(reply, question_type, expected):
    assert extract_answer(reply, "ABCDE", official=True, multiple=question_type == MULTIPLE) == expected


# Every difference between the two modes, as the README table lists it: (reply, options, multiple, default, official)
MODE_DIFFERENCES = [
    ("ACE抑制剂是首选药物。", "ABCDE", False, "", "A"),
    ("ACE抑制剂是首选药物。", "ABCDE", True, "", "ACE"),
    ("答案是CA", "ABCDE", True, "AC", "CA"),
    ("答案是AA", "ABCDE", True, "A", "AA"),
    ("不选A，选D。", "ABCDE", False, "D", "A"),
    ("答案是A和C", "ABCDE", False, "AC", "A"),
    ("正确答案是B，不是A", "ABCDE", True, "B", "BA"),
    ("A项错误，B项正确", "ABCDE", False, "B", "A"),
    ("答案：Ｂ", "ABCDE", False, "B", ""),
    ("答案是Ａ、Ｃ", "ABCDE", True, "AC", ""),
    ("Answer: B", "ABCDE", False, "B", "A"),
    ("答案是F", "ABCDE", False, "", "F"),
    ("我无法确定，请咨询医生。", "ABCDE", False, "", ""),
]


@pytest.mark.parametrize("reply, options, multiple, default, official", MODE_DIFFERENCES)
def test_default_and_official_extraction_differ_as_documented(reply, options, multiple, default, official):
    assert extract_answer(reply, options, multiple=multiple) == default
    assert extract_answer(reply, options, official=True, multiple=multiple) == official


@pytest.mark.parametrize("reply, options, expected", [
    ("答案：\nB", "ABCDE", "B"),  # the answer on the line after the cue
    ("答案是：\n\nC. 阿莫西林", "ABCDE", "C"),
    ("B选项正确。", "ABCDE", "B"),
    ("选项D正确，其余均错误", "ABCDE", "D"),
    ("逐项分析后，所以B选项是正确的", "ABCDE", "B"),
    ("A项错误；C项正确；E项错误", "ABCDE", "C"),
    ("A选项正确，C选项正确，B选项不正确", "ABCDE", "AC"),
    ("答案是ABCDE都对", "ABCDE", "ABCDE"),
    ("答案是ABD均正确", "ABCDE", "ABD"),
    ("正确答案是B选项", "ABCDE", "B"),
    ("答案是F", "ABCDEF", "F"),  # letters beyond E on a six-option item
    ("答案：\nG", "ABCDEFG", "G"),
    ("答案是F", "ABCDE", ""),  # not an option of this item
    ("B选项不正确，A项对应的是另一种疾病。", "ABCDE", ""),  # neither a verdict of "right" nor an answer
    ("补充维生素C正确的做法是饭后服用", "ABCDE", ""),  # a letter not named as an option
    ("答案是A，B选项是干扰项。", "ABCDE", "A"),
    ("ACE抑制剂是首选药物。", "ABCDE", ""),
    ("不选A，选D", "ABCDE", "D"),
])
def test_default_extraction_catches_answers_the_issue_lists(reply, options, expected):
    assert extract_answer(reply, options) == expected


# -- options and prompts ---------------------------------------------------------------------------------------------

def exam_items(tmp_path, records: list[dict]):
    path = tmp_path / "items.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return load_records(path, "exam")[0]


def an_item(number: int, exam_class: str = "执业医师", **fields) -> dict:
    return {"id": f"v{number}", "exam_type": "医师考试", "exam_class": exam_class, "question_type": SINGLE,
            "question": f"问题{number}", "option": {"A": "阿莫西林", "B": "多西环素"}, "answer": "A",
            "explanation": f"解析{number}。"} | fields


def test_official_options_keep_file_order_and_drop_exactly_the_one_character_values(tmp_path):
    options = {"C": "头孢呋辛", "A": "无", "B": "无 ", "D": "四环素"}
    item = exam_items(tmp_path, [an_item(1, option=options)])[0]
    assert list(shown_options(item, official=True)) == ["C", "B", "D"]  # "无" dropped, "无 " kept (no strip)
    assert item_prompt(item, official=True).endswith("\nC. 头孢呋辛\nB. 无 \nD. 四环素")
    assert list(shown_options(item)) == ["A", "B", "C", "D"]  # default: every option, letter order
    assert item_prompt(item).endswith("\nA. 无\nB. 无 \nC. 头孢呋辛\nD. 四环素")


def test_official_few_shot_examples_filter_options_and_reply_as_the_official_scripts(tmp_path):
    shot, item = exam_items(tmp_path, [an_item(1, option={"B": "无", "A": "阿莫西林"}, answer="B"), an_item(2)])
    messages = item_messages(item, [shot], official=True)
    # the official scripts filter an example's options like the question's (len(value) > 1), in file order
    assert messages[0]["content"].endswith("问题1\nA. 阿莫西林")
    assert item_messages(item, [shot])[0]["content"].endswith("问题1\nA. 阿莫西林\nB. 无")  # default: all, sorted
    assert messages[1]["content"] == "答案是B。"
    cot = item_messages(item, [shot], cot=True, official=True)
    assert cot[1]["content"] == "解析1。所以答案是B。"
    assert item_messages(item, [shot])[1]["content"] == "B"  # default: the bare letters
    assert item_messages(item, [shot], cot=True)[1]["content"] == "解析1。\n所以答案是B。"


def test_official_shots_are_a_seeded_random_sample_of_the_same_type_and_class():
    val, _ = load_records(CMB / "val.json", "exam")
    tests, _ = load_records(CMB / "test.json", "exam")
    val_classes = {(v.exam_type, v.exam_class) for v in val}
    missing = [t for t in tests if (t.exam_type, t.exam_class) not in val_classes]
    assert missing and all(pick_shots(val, t, 3, official=True) == [] for t in missing)  # no example of another class
    tests = [t for t in tests if t not in missing]
    draws = {t.id: pick_shots(val, t, 3, official=True, seed=7) for t in tests}
    for test_item in tests:
        shots = draws[test_item.id]
        assert len(shots) == 3 and len({s.id for s in shots}) == 3
        assert all((s.exam_type, s.exam_class) == (test_item.exam_type, test_item.exam_class) for s in shots)
        assert [s.id for s in pick_shots(val, test_item, 3, official=True, seed=7)] == [s.id for s in shots]
    first_three = {t.id: [v.id for v in val if v.exam_class == t.exam_class][:3] for t in tests}
    assert sum([s.id for s in draws[t.id]] != first_three[t.id] for t in tests) > len(tests) // 2  # random, not first
    reseeded = {t.id: [s.id for s in pick_shots(val, t, 3, official=True, seed=8)] for t in tests}
    assert sum(reseeded[t.id] != [s.id for s in draws[t.id]] for t in tests) > len(tests) // 2
    # the default stays deterministic: the first val items of the same class, in file order
    assert [s.id for s in pick_shots(val, tests[0], 3)] == first_three[tests[0].id]
    # an item is never its own example (evaluating the val split)
    assert all(s.id != v.id for v in val for s in pick_shots(val, v, 5, official=True))


# -- majority vote and sampling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("answers, expected", [
    (["", "B", "A", "B", "A"], "B"),  # tie: the first seen wins
    (["C", "A", "A"], "A"),
    (["CA", "AC", "CA"], "CA"),  # official extractions are strings, not letter sets
    (["", ""], ""),
    ([], ""),
])
def test_majority_vote(answers, expected):
    assert majority_vote(answers) == expected


def test_sampled_replies_are_reproducible_and_independent_of_the_batch(glm4_dir):
    from medtune.eval.backends import LocalBackend

    backend = LocalBackend(str(glm4_dir), batch_size=4)
    first = [{"role": "user", "content": "以下是一道单项选择题，直接输出答案选项。"}]
    second = [{"role": "user", "content": "孕妇可以使用四环素吗？"}]
    together = backend.generate([first, second], 6, num_samples=3, seed=5)
    assert len(together) == 6
    assert backend.generate([second], 6, num_samples=3, seed=5) == together[3:]  # same samples alone or batched
    assert len(set(together[:3])) > 1  # sampled, not three greedy copies
    assert backend.generate([first, second], 6, num_samples=3, seed=6) != together
    greedy = backend.generate([first, second], 6)
    assert len(greedy) == 2 and greedy == backend.generate([first, second], 6)


class SamplingServer(FakeOpenAI):
    """Answers by the request's seed, so the vote is known: seeds 42, 43, 44 -> B, A, B."""

    replies = {42: "所以答案是B。", 43: "答案：A", 44: "B选项正确。"}
    bodies: list[dict] = []

    def answer(self, body: dict) -> str:
        self.bodies.append(body)
        return self.replies[body["seed"]]


@contextmanager
def serving(handler):
    """An OpenAI-compatible fake on a free local port, for the duration of the block."""
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def test_cmb_exam_votes_over_sampled_replies_and_keeps_them(tmp_path, capsys):
    with serving(SamplingServer) as url:
        code, err = medtune(capsys, "eval", "cmb-exam", "--endpoint", url, "--num_samples", "3", "--temperature",
                            "0.7", "--top_p", "0.9", "--limit", "4", "--output_dir", str(tmp_path))
    assert code == 0, err[-2000:]
    assert {(b["temperature"], b["top_p"]) for b in SamplingServer.bodies} == {(0.7, 0.9)}
    assert sorted(b["seed"] for b in SamplingServer.bodies) == [42] * 4 + [43] * 4 + [44] * 4
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text("utf-8").splitlines()]
    assert len(records) == 4
    for record in records:
        assert record["replies"] == [SamplingServer.replies[s] for s in (42, 43, 44)]
        assert record["sample_answers"] == ["B", "A", "B"] and record["model_answer"] == "B"
    assert {a["model_answer"] for a in json.loads((tmp_path / "answers.json").read_text("utf-8"))} == {"B"}


def test_num_samples_needs_generate_mode():
    from medtune.eval.runner import resolve_mode

    with pytest.raises(ConfigError, match="needs --mode generate"):
        resolve_mode(EvalArguments(mode="likelihood", num_samples=3))
    assert resolve_mode(EvalArguments(num_samples=3)) == "generate"


class FixedReply(FakeOpenAI):
    """Every reply says "ACE抑制剂是首选药物。": official extracts A (single) or ACE (multiple), default nothing."""

    reply = "ACE抑制剂是首选药物。"


def test_cmb_exam_official_extracts_and_scores_as_the_official_scripts(tmp_path, capsys):
    with serving(FixedReply) as url:
        runs = {flag: medtune(capsys, "eval", "cmb-exam", "--endpoint", url, "--limit", "60", "--output_dir",
                              str(tmp_path / flag), "--official", flag) for flag in ("true", "false")}
    assert all(code == 0 for code, _ in runs.values()), runs["true"][1][-2000:]
    items = load_records(CMB / "test.json", "exam")[0][:60]
    truth = {r["id"]: r["answer"] for r in json.loads((CMB / "test_answers.json").read_text("utf-8"))}
    official = {a["id"]: a["model_answer"] for a in json.loads((tmp_path / "true" / "answers.json").read_text())}
    assert official == {i.id: "ACE" if i.multiple else "A" for i in items}
    expected = sum(truth[i.id] == official[i.id] for i in items) / len(items)
    assert json.loads((tmp_path / "true" / "results.json").read_text())["item_accuracy"] == pytest.approx(expected)
    assert json.loads((tmp_path / "false" / "results.json").read_text())["item_accuracy"] == 0


# -- cmb-score -------------------------------------------------------------------------------------------------------

def official_score_py(predictions: dict, truth: list[dict]) -> tuple[dict, dict]:
    """A straight re-implementation of the official score.py: exact strings, per class, per type the class mean."""
    stats = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row in truth:
        cell = stats[row["exam_type"]][row["exam_class"]]
        cell[1] += 1
        if row["answer"] == predictions.get(row["id"], ""):
            cell[0] += 1
    per_class = {(t, c): right / total for t, classes in stats.items() for c, (right, total) in classes.items()}
    per_type = {t: sum(right / total for right, total in classes.values()) / len(classes) for t, classes in stats.items()}
    return per_class, per_type


def respelt(answer: str, n: int) -> str:
    """The right letters written as other tools write them, or a wrong answer."""
    return [answer, answer[::-1], answer.lower(), ",".join(answer), "A" if answer != "A" else "B", ""][n % 6]


def test_cmb_score_official_compares_exact_strings_and_default_reports_what_normalising_changed(tmp_path, capsys,
                                                                                                caplog):
    truth = json.loads((CMB / "test_answers.json").read_text("utf-8"))
    answers = [{"id": r["id"], "model_answer": respelt(r["answer"], n)} for n, r in enumerate(truth)]
    (tmp_path / "answers.json").write_text(json.dumps(answers, ensure_ascii=False), encoding="utf-8")
    predictions = {a["id"]: a["model_answer"] for a in answers}
    scored = {}
    caplog.set_level(logging.INFO)
    for flag in ("true", "false"):
        caplog.clear()
        code, err = medtune(capsys, "eval", "cmb-score", "--predictions", str(tmp_path / "answers.json"), "--truth",
                            str(CMB / "test_answers.json"), "--output_dir", str(tmp_path / flag), "--official", flag)
        assert code == 0, err[-2000:]
        scored[flag] = (json.loads((tmp_path / flag / "results.json").read_text("utf-8")), caplog.text)
    per_class, per_type = official_score_py(predictions, truth)
    official = scored["true"][0]
    assert {(r["exam_type"], r["exam_class"]): r["accuracy"] for r in official["by_class"]} == pytest.approx(per_class)
    assert official["by_type"] == pytest.approx(per_type)
    assert official["overall"] == pytest.approx(sum(per_type.values()) / len(per_type))

    respelt_right = sum(1 for r in truth if predictions[r["id"]] != r["answer"]
                        and "".join(sorted(predictions[r["id"]].upper().replace(",", ""))) == r["answer"])
    assert respelt_right > 30
    default, log = scored["false"]
    assert default["right_only_when_normalised"] == official["right_only_when_normalised"] == respelt_right
    exact_right = sum(predictions[r["id"]] == r["answer"] for r in truth)
    assert default["item_accuracy"] == pytest.approx((exact_right + respelt_right) / len(truth))
    assert official["item_accuracy"] == pytest.approx(exact_right / len(truth))
    assert f"{respelt_right} answers were counted right only thanks to normalisation" in log


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


TRUTH = [{"id": "q1", "exam_type": "医师考试", "exam_class": "执业医师", "answer": "A"},
         {"id": "q2", "exam_type": "医师考试", "exam_class": "执业医师", "answer": "BD"}]


def as_lines(records: list[dict]) -> str:
    return "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]\n"


@pytest.mark.parametrize("case, predictions, truth, expected", [
    ("answer field", as_lines([{"id": "q1", "answer": "A"}]), as_lines(TRUTH),
     "predictions.json:2: model_answer: missing; cmb-score expects the official answer-file field `model_answer` "
     "(this record has `answer`"),
    ("empty truth", as_lines([{"id": "q1", "model_answer": "A"}]), "[]\n", "truth.json: no records: the file is empty"),
    ("empty truth file", as_lines([{"id": "q1", "model_answer": "A"}]), "", "truth.json: no records: the file is empty"),
    ("duplicated truth id", as_lines([{"id": "q1", "model_answer": "A"}]), as_lines(TRUTH + TRUTH[:1]),
     "truth.json:4: id: duplicated id 'q1' (first at "),
    ("duplicated prediction id", as_lines([{"id": "q1", "model_answer": "A"}, {"id": "q1", "model_answer": "B"}]),
     as_lines(TRUTH), "predictions.json:3: id: duplicated id 'q1' (first at line 2)"),
    ("empty predictions", "[]", as_lines(TRUTH), "predictions.json: holds no answers"),
])
def test_cmb_score_refuses_answer_files_it_cannot_score(tmp_path, capsys, case, predictions, truth, expected):
    out = tmp_path / "out"
    code, err = medtune(capsys, "eval", "cmb-score", "--predictions",
                        str(write(tmp_path / "predictions.json", predictions)), "--truth",
                        str(write(tmp_path / "truth.json", truth)), "--output_dir", str(out))
    assert code == 2 and expected in err, (case, err)
    assert err.strip().splitlines() == [err.strip()] and err.startswith("medtune: error: ") and not out.exists()


def test_cmb_score_names_a_predictions_file_that_is_not_utf8_and_reads_a_bom(tmp_path, capsys):
    truth = write(tmp_path / "truth.json", as_lines(TRUTH))
    answers = as_lines([{"id": "q1", "model_answer": "A"}, {"id": "q2", "model_answer": "乙"}])
    code, err = medtune(capsys, "eval", "cmb-score", "--predictions",
                        str(write(tmp_path / "gbk.json", answers, "gbk")), "--truth", str(truth), "--output_dir",
                        str(tmp_path / "gbk"))
    assert code == 2 and err.strip().splitlines() == [err.strip()], err
    assert f"{tmp_path / 'gbk.json'}:3: not valid UTF-8" in err and not (tmp_path / "gbk").exists()
    code, err = medtune(capsys, "eval", "cmb-score", "--predictions",
                        str(write(tmp_path / "bom.json", answers, "utf-8-sig")), "--truth", str(truth),
                        "--output_dir", str(tmp_path / "bom"))
    assert code == 0, err[-2000:]
    results = json.loads((tmp_path / "bom" / "results.json").read_text("utf-8"))
    assert (results["item_accuracy"], results["items"], results["unanswered"]) == (0.5, 2, 0)


def test_official_shot_sampling_is_python_random_sample():
    # the official scripts call random.sample on the filtered val list; ours does the same with a seeded generator
    val, _ = load_records(CMB / "val.json", "exam")
    item = load_records(CMB / "test.json", "exam")[0][0]
    pool = [v for v in val if (v.exam_type, v.exam_class) == (item.exam_type, item.exam_class)]
    expected = random.Random(f"42:{item.id}").sample(pool, 4)
    assert pick_shots(val, item, 4, official=True) == expected

"""`medtune data convert`: C-Eval and CMMLU CSV files become CMB-Exam items that `medtune eval cmb-exam` scores."""

from __future__ import annotations

import json

from medtune.cli import main as medtune_main

from .conftest import run_medtune

SINGLE = "单项选择题"


def write(path, text: str, encoding: str = "utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def convert(capsys, *argv: str) -> tuple[int, list[str]]:
    code = medtune_main(["data", "convert", *argv])
    return code, capsys.readouterr().err.strip().splitlines()


CEVAL_VAL = ('id,question,A,B,C,D,answer\n'
             '0,"下列属于β受体阻滞剂的是",美托洛尔,硝苯地平,卡托普利,氢氯噻嗪,A\n'
             '1,"关于TCP协议，下列说法正确的是\n（多行题干）","无连接","面向连接，可靠传输",尽力而为,广播,B\n')
CEVAL_DEV = ('id,question,A,B,C,D,answer,explanation\n'
             '0,1+1=,1,2,3,4,B,1. 一加一等于二\n')


def test_ceval_files_become_cmb_exam_items(tmp_path, capsys):
    write(tmp_path / "ceval" / "val" / "clinical_medicine_val.csv", CEVAL_VAL)
    write(tmp_path / "ceval" / "dev" / "high_school_mathematics_dev.csv", CEVAL_DEV)
    output = tmp_path / "general.json"
    assert convert(capsys, "--from", "ceval", str(tmp_path / "ceval"), "--output", str(output)) == (0, [])
    common = {"exam_type": "C-Eval", "question_type": SINGLE}
    assert json.loads(output.read_text(encoding="utf-8")) == [  # files in sorted path order: dev/ before val/
        {"id": "high_school_mathematics_dev-0", "exam_type": "C-Eval", "exam_class": "high_school_mathematics",
         "exam_subject": "high_school_mathematics", "question": "1+1=",
         "option": {"A": "1", "B": "2", "C": "3", "D": "4"}, "answer": "B", "question_type": SINGLE,
         "explanation": "1. 一加一等于二"},
        {"id": "clinical_medicine_val-0", **common, "exam_class": "clinical_medicine",
         "exam_subject": "clinical_medicine", "question": "下列属于β受体阻滞剂的是",
         "option": {"A": "美托洛尔", "B": "硝苯地平", "C": "卡托普利", "D": "氢氯噻嗪"}, "answer": "A"},
        {"id": "clinical_medicine_val-1", **common, "exam_class": "clinical_medicine",
         "exam_subject": "clinical_medicine", "question": "关于TCP协议，下列说法正确的是\n（多行题干）",
         "option": {"A": "无连接", "B": "面向连接，可靠传输", "C": "尽力而为", "D": "广播"}, "answer": "B"},
    ]


def test_cmmlu_files_and_header_variants(tmp_path, capsys):
    # as shipped: an unnamed index column; then a re-saved copy: BOM, pandas' "Unnamed: 0", other case, spaces,
    # CRLF line ends and a lower-case answer
    write(tmp_path / "cmmlu" / "test" / "anatomy.csv",
          ",Question,A,B,C,D,Answer\n0,人体最大的器官是,心,肝,皮肤,肺,C\n1,成人骨骼数目约为,106,206,306,406,B\n")
    write(tmp_path / "cmmlu" / "dev" / "anatomy.csv",
          "Unnamed: 0, question ,a,b,c,d, answer\r\n7,胃位于腹腔的,左上部,右下部,盆腔,背部,a\r\n", "utf-8-sig")
    output = tmp_path / "out" / "cmmlu.json"
    assert convert(capsys, "--from", "cmmlu", str(tmp_path / "cmmlu"), "--output", str(output)) == (0, [])
    item = {"exam_type": "CMMLU", "exam_class": "anatomy", "exam_subject": "anatomy", "question_type": SINGLE}
    assert json.loads(output.read_text(encoding="utf-8")) == [
        {"id": "anatomy_dev-7", **item, "question": "胃位于腹腔的",
         "option": {"A": "左上部", "B": "右下部", "C": "盆腔", "D": "背部"}, "answer": "A"},
        {"id": "anatomy_test-0", **item, "question": "人体最大的器官是",
         "option": {"A": "心", "B": "肝", "C": "皮肤", "D": "肺"}, "answer": "C"},
        {"id": "anatomy_test-1", **item, "question": "成人骨骼数目约为",
         "option": {"A": "106", "B": "206", "C": "306", "D": "406"}, "answer": "B"},
    ]


def test_missing_answer_column_is_one_line_and_nothing_is_written(tmp_path, capsys):
    test_split = write(tmp_path / "clinical_medicine_test.csv", "id,question,A,B,C,D\n0,题干,甲,乙,丙,丁\n")
    output = tmp_path / "out.json"
    assert convert(capsys, "--from", "ceval", str(test_split), "--output", str(output)) == (2, [
        f"medtune: error: {test_split}:1: answer: missing column (the header is id,question,A,B,C,D; C-Eval files "
        "have id,question,A,B,C,D,answer[,explanation]); C-Eval test files hold no answers: convert the val or dev "
        "split"])
    assert not output.exists()


def test_bad_rows_name_their_line_and_column(tmp_path, capsys):
    bad = write(tmp_path / "virology.csv", (",Question,A,B,C,D,Answer\n"
                                           "0,题一,甲,乙,丙,丁,E\n"
                                           '1,"题二\n跨两行",甲,,丙,丁,A\n'
                                           "2,题三,甲,乙,丙,丁,\n"
                                           "3,题四,甲,乙,丙\n"))
    assert convert(capsys, "--from", "cmmlu", str(bad), "--output", str(tmp_path / "out.json")) == (2, [
        f"medtune: error: {bad}:2: answer: 'E' names an option that does not exist (options: ABCD)",
        f"medtune: error: {bad}:3: B: expected non-empty text",
        f"medtune: error: {bad}:5: answer: empty: an item without its answer cannot be scored (a test split whose "
        "answers are not public cannot be converted; use val or dev)",
        f"medtune: error: {bad}:6: 5 fields where the header has 7 (an unquoted comma or line break inside a "
        "field?)"])
    assert not (tmp_path / "out.json").exists()


def test_the_same_file_twice_is_refused(tmp_path, capsys):
    path = write(tmp_path / "a" / "anatomy.csv", ",Question,A,B,C,D,Answer\n0,题,甲,乙,丙,丁,A\n")
    copy = write(tmp_path / "b" / "anatomy.csv", path.read_text(encoding="utf-8"))
    assert convert(capsys, "--from", "cmmlu", str(path), str(copy), "--output", str(tmp_path / "o.json")) == (2, [
        f"medtune: error: {copy}:2: id: 'anatomy-0' repeats {path}:2 (the same file given twice?)"])


def test_converted_items_are_scored_by_eval_cmb_exam(tmp_path, glm4_dir, capsys):
    write(tmp_path / "clinical_medicine_val.csv", CEVAL_VAL)
    write(tmp_path / "high_school_mathematics_dev.csv", CEVAL_DEV)
    converted = tmp_path / "general.json"
    assert convert(capsys, "--from", "ceval", str(tmp_path), "--output", str(converted)) == (0, [])
    out = tmp_path / "eval"
    result = run_medtune("eval", "cmb-exam", "--model_name_or_path", str(glm4_dir), "--data_dir", str(converted),
                         "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    answers = {a["id"]: a["model_answer"] for a in json.loads((out / "answers.json").read_text(encoding="utf-8"))}
    keys = {"clinical_medicine_val-0": "A", "clinical_medicine_val-1": "B", "high_school_mathematics_dev-0": "B"}
    assert set(answers) == set(keys) and all(a in "ABCD" and len(a) == 1 for a in answers.values())
    right = {i: answers[i] == k for i, k in keys.items()}
    by_class = {(row["exam_type"], row["exam_class"]): (row["accuracy"], row["items"]) for row in results["by_class"]}
    assert by_class == {
        ("C-Eval", "clinical_medicine"): ((right["clinical_medicine_val-0"] + right["clinical_medicine_val-1"]) / 2, 2),
        ("C-Eval", "high_school_mathematics"): (float(right["high_school_mathematics_dev-0"]), 1)}
    assert results["items"] == 3 and results["item_accuracy"] == sum(right.values()) / 3


def test_gbk_file_is_one_line_with_its_line_number(tmp_path, capsys):
    """Excel saves Chinese CSV as GBK: one problem, at the line of the first byte that is not UTF-8, and no second
    (false) 'the file is empty'."""
    gbk = write(tmp_path / "clinical_medicine_val.csv", CEVAL_VAL, encoding="gbk")
    output = tmp_path / "out.json"
    assert convert(capsys, "--from", "ceval", str(gbk), "--output", str(output)) == (2, [
        f"medtune: error: {gbk}:2: not valid UTF-8 (byte 0xcf at column 4); re-save the file as UTF-8"])
    assert not output.exists()


def test_output_that_is_a_folder_is_one_line_before_any_work(tmp_path, capsys):
    data = write(tmp_path / "clinical_medicine_val.csv", CEVAL_VAL)
    (tmp_path / "out").mkdir()
    assert convert(capsys, "--from", "ceval", str(data), "--output", str(tmp_path / "out")) == (2, [
        f"medtune: error: --output {tmp_path / 'out'}: is a folder; give a file name"])
    assert list((tmp_path / "out").iterdir()) == []

"""`medtune data scrub`: recall and precision on a planted-PII corpus, record structure in every format,
placeholders numbered per record, bad input refused with file:line, and a report without the values."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from stdnum import luhn
from stdnum.cn import ric

from medtune.data.pii import KINDS
from medtune.data.pii.replace import Replacer, find_in_record
from medtune.data.scrub import REPORT_NAME, scrub_paths
from medtune.errors import ConfigError

from .conftest import run_medtune
from .data.pii.generate import generate  # the planted corpus lives with the test data

ASCII_DIGITS = str.maketrans("０１２３４５６７８９", "0123456789")
NUMBER_KINDS = ("phone", "id_card", "record_no", "email", "address", "birth_date", "bank_card", "age")


@pytest.fixture(scope="module")
def corpus():
    return generate(records=1000, seed=0)


def overlaps(a_start, a_end, b_start, b_end) -> bool:
    return a_start < b_end and b_start < a_end


def score(corpus) -> tuple[Counter, Counter, Counter, Counter]:
    """(gold, recalled, detected, correct) per kind. A gold item is recalled only when findings of its kind cover
    every character of it (a half-replaced phone number still leaks); a finding is correct when it overlaps a gold
    item of its kind, so one on a look-alike or on plain text is a false positive."""
    gold, recalled, detected, correct = Counter(), Counter(), Counter(), Counter()
    for record in corpus:
        found = find_in_record([text for text, _ in record])
        for (_, spans), findings in zip(record, found):
            planted = [s for s in spans if not s[2].startswith("lookalike:")]
            for start, end, kind in planted:
                gold[kind] += 1
                covered = sum(min(f.end, end) - max(f.start, start) for f in findings
                              if f.kind == kind and overlaps(f.start, f.end, start, end))
                recalled[kind] += covered == end - start
            for f in findings:
                detected[f.kind] += 1
                correct[f.kind] += any(k == f.kind and overlaps(f.start, f.end, s, e) for s, e, k in planted)
    return gold, recalled, detected, correct


def test_planted_corpus_meets_recall_and_precision_targets(corpus):
    gold, recalled, detected, correct = score(corpus)
    rows = [f"{'kind':<11}{'planted':>8}{'recall':>8}{'found':>7}{'precision':>10}"]
    for kind in KINDS:
        rows.append(f"{kind:<11}{gold[kind]:>8}{recalled[kind] / gold[kind]:>8.3f}{detected[kind]:>7}"
                    f"{correct[kind] / max(detected[kind], 1):>10.3f}")
    precision = sum(correct.values()) / sum(detected.values())
    rows.append(f"overall precision {precision:.4f}")
    table = "\n".join(rows)
    print("\n" + table)
    assert all(gold[kind] >= 300 for kind in KINDS), table
    assert all(recalled[kind] / gold[kind] >= 0.99 for kind in NUMBER_KINDS), table
    assert recalled["name"] / gold["name"] >= 0.95, table
    assert precision >= 0.98, table


def test_planted_corpus_is_what_it_claims(corpus):
    """Every planted ID has a valid check digit and every card passes Luhn; the look-alikes are there, among them
    ID-shaped numbers with a wrong check digit, and none of those is taken for an ID."""
    values = Counter()
    lookalikes = Counter()
    for record in corpus:
        for text, spans in record:
            for start, end, kind in spans:
                value = text[start:end]
                if kind == "id_card" and len(value) == 18:
                    assert ric.calc_check_digit(value) == value[-1], value
                    values["id18"] += 1
                elif kind == "id_card":
                    values["id15"] += 1
                elif kind == "bank_card":
                    assert luhn.is_valid(value.replace(" ", "").translate(ASCII_DIGITS)), value
                elif kind == "lookalike:bad-checksum ID":
                    assert ric.calc_check_digit(value) != value[-1], value
                if kind.startswith("lookalike:"):
                    lookalikes[kind.split(":", 1)[1]] += 1
    assert values["id18"] >= 300 and values["id15"] >= 30
    # the clinical story holds together: thrombolysis (within 4.5 h) only for strokes of at most 4 h, appendicitis
    # pain that moved after 6 h has lasted longer than that, menorrhagia only between 20 and 50
    texts = [text for record in corpus for text, _ in record]
    stroke = [int(h) for text in texts for h in re.findall(r"突发左侧肢体无力(\d+)小时", text)]
    appendix = [int(h) for text in texts for h in re.findall(r"转移性右下腹痛(\d+)小时", text)]
    assert stroke and max(stroke) <= 4 and appendix and min(appendix) >= 8
    assert all(20 <= int(age) <= 50 for text in texts if "月经量多" in text
               for age in re.findall(r"(?:年龄：|，女，|今年)(\d+)岁", text))
    assert set(lookalikes) == {"lab value", "age<=89", "herb", "department", "onset date", "ICD-10",
                               "bad-checksum ID", "visit date", "after 患者"}
    assert lookalikes["after 患者"] >= 500
    assert sum(lookalikes.values()) >= 3000


def test_nothing_is_found_in_the_bundled_corpus():
    """Text we did not write for this test (guidelines, consultations, drug-safety answers, CMB-style items) holds
    no personal information: every finding there would be a false positive."""
    from medtune.paths import bundled_data_dir

    files = sorted(bundled_data_dir().rglob("*.json*")) + sorted(bundled_data_dir().rglob("*.txt"))
    lines = [line for path in files for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(files) >= 8 and len(lines) >= 1000
    assert [line[max(0, s.start - 10):s.end + 5] for line in lines for s in find_in_record([line])[0]] == []


def test_invalid_check_digit_is_an_id_only_after_an_id_cue():
    bad = "110105194912310021"  # the check digit of 11010519491231002 is X
    replaced = Replacer().scrub_fields([f"身份证号：{bad}", f"标本条码：{bad}", "旧身份证110105491231002"])
    assert replaced == ["身份证号：[身份证号1]", f"标本条码：{bad}", "旧身份证[身份证号2]"]


def test_placeholders_are_consistent_within_a_record_and_restart_with_the_next():
    replacer = Replacer()
    first = replacer.scrub_fields(["患者张建华，电话138-1234-5678，其子张明陪同。",
                                   "张建华本人签字，复诊请拨13812345678或13900001111。"])
    assert first == ["患者[姓名1]，电话[电话1]，其子[姓名2]陪同。",
                     "[姓名1]本人签字，复诊请拨[电话1]或[电话2]。"]
    assert replacer.scrub_fields(["患者李秀英，电话13900001111。"]) == ["患者[姓名1]，电话[电话1]。"]
    assert replacer.counts == Counter({"name": 4, "phone": 4})


def test_look_alikes_stay():
    text = ("予阿莫西林0.5g tid、黄连素0.3g tid，停用何首乌、白芍。WBC 12.3×10^9/L，血红蛋白 98 g/L，诊断I10、"
            "E11.9。2024年3月起病，发病时间3天前，入院日期：2024-03-05。转呼吸与危重症医学科、心内科。"
            "患者男，89岁，年龄≥90岁者慎用，90岁以上老人减量，心率96次/分，体重95kg，病程90天。徐长卿、刘寄奴煎服。")
    assert Replacer().scrub_fields([text]) == [text]


def write(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(x, ensure_ascii=False) if not isinstance(x, str) else x) + "\n"
                            for x in lines), encoding="utf-8")
    return path


FORMATS = {
    "text.jsonl": ({"text": "患者王志刚，电话13812345678。", "meta": {"id": "a1"}},
                   {"text": "患者[姓名1]，电话[电话1]。", "meta": {"id": "a1"}}),
    "sharegpt.jsonl": ({"conversations": [{"from": "human", "value": "我叫刘秀英，邮箱lxy@163.com"},
                                          {"from": "gpt", "value": "刘秀英您好，已记录lxy@163.com。"}], "id": 7},
                       {"conversations": [{"from": "human", "value": "我叫[姓名1]，邮箱[邮箱1]"},
                                          {"from": "gpt", "value": "[姓名1]您好，已记录[邮箱1]。"}], "id": 7}),
    "openai.jsonl": ({"messages": [{"role": "system", "content": "你是医生"},
                                   {"role": "user", "content": "住院号：ZY20240311，今年93岁"},
                                   {"role": "assistant", "content": "好的"}]},
                     {"messages": [{"role": "system", "content": "你是医生"},
                                   {"role": "user", "content": "住院号：[病历号1]，今年[年龄1]"},
                                   {"role": "assistant", "content": "好的"}]}),
    "alpaca.jsonl": ({"instruction": "出生日期：1950年2月3日", "input": "家住北京市海淀区学院路38号", "output": "收到",
                      "history": [["电话0571-87654321", "好"]], "system": ""},
                     {"instruction": "出生日期：[出生日期1]", "input": "家住[地址1]", "output": "收到",
                      "history": [["电话[电话1]", "好"]], "system": ""}),
    "preference.jsonl": ({"question": "卡号6222021234567890128", "response_chosen": "请勿泄露卡号",
                          "response_rejected": "已记下6222021234567890128"},
                         {"question": "卡号[银行卡号1]", "response_chosen": "请勿泄露卡号",
                          "response_rejected": "已记下[银行卡号1]"}),
    "preference_hf.jsonl": ({"prompt": "证件号11010519491231002X",
                             "chosen": [{"role": "assistant", "content": "不要提供11010519491231002X"}],
                             "rejected": "好"},
                            {"prompt": "证件号[身份证号1]",
                             "chosen": [{"role": "assistant", "content": "不要提供[身份证号1]"}], "rejected": "好"}),
    "preference_conversations.jsonl": (
        {"conversations": [{"from": "human", "value": "请王主任看看"}],
         "chosen": {"from": "gpt", "value": "王主任明天出诊"}, "rejected": {"from": "gpt", "value": "不知道"}},
        {"conversations": [{"from": "human", "value": "请[姓名1]主任看看"}],
         "chosen": {"from": "gpt", "value": "[姓名1]主任明天出诊"}, "rejected": {"from": "gpt", "value": "不知道"}}),
}


def test_every_format_keeps_its_structure(tmp_path):
    source = tmp_path / "in"
    (source / "sub").mkdir(parents=True)
    for name, (record, _) in FORMATS.items():
        write(source / name, [record])
    (source / "sub" / "notes.txt").write_text("患者赵敏，男，92岁。\n\n主治医师：欧阳明华\n", encoding="utf-8")
    (source / "array.json").write_text(json.dumps([FORMATS["text.jsonl"][0]] * 2, ensure_ascii=False),
                                       encoding="utf-8")
    report = scrub_paths([str(source)], tmp_path / "out")
    for name, (_, expected) in FORMATS.items():
        assert (tmp_path / "out" / name).read_text(encoding="utf-8") == json.dumps(expected, ensure_ascii=False) + "\n"
    assert (tmp_path / "out" / "sub" / "notes.txt").read_text(encoding="utf-8") == \
        "患者[姓名1]，男，[年龄1]。\n\n主治医师：[姓名1]\n"
    assert json.loads((tmp_path / "out" / "array.json").read_text(encoding="utf-8")) == \
        [FORMATS["text.jsonl"][1]] * 2
    assert report["records"] == len(FORMATS) + 2 + 2
    scrub_paths([str(source)], tmp_path / "again")  # deterministic: the same bytes every time
    assert {p.relative_to(tmp_path / "out"): p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} \
        == {p.relative_to(tmp_path / "again"): p.read_bytes() for p in (tmp_path / "again").rglob("*") if p.is_file()}
    assert report["files"][str(source / "sub" / "notes.txt")] == {
        "records": 2, "replaced": {**dict.fromkeys(KINDS, 0), "name": 2, "age": 1}}


def test_bad_record_names_file_and_line_and_writes_nothing(tmp_path):
    good = {"messages": [{"role": "user", "content": "患者王志刚，电话13812345678。"}, {"role": "assistant", "content": "好"}]}
    data = write(tmp_path / "in.jsonl", [good, "{not json", good, {"messages": [{"role": "doctor", "content": "x"}]}])
    result = run_medtune("data", "scrub", str(data), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"medtune: error: {data}:2: invalid JSON: Expecting property name enclosed in double quotes (column 2)",
        f"medtune: error: {data}:4: messages[0].role: unknown role 'doctor' (use one of assistant, gpt, human, "
        "system, user)",
    ]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))


def test_output_dir_inside_or_around_the_input_is_refused(tmp_path):
    """`data scrub mixed --output_dir mixed/clean` would read its own output on the next run; an output folder
    holding the input would overwrite it. Both stop before anything is read or written."""
    data = write(tmp_path / "mixed" / "in.jsonl", [{"text": "患者张伟，电话13812345678"}]) if \
        (tmp_path / "mixed").mkdir() is None else None
    with pytest.raises(ConfigError) as inside:
        scrub_paths([str(tmp_path / "mixed")], tmp_path / "mixed" / "clean")
    assert str(inside.value) == (f"--output_dir {tmp_path / 'mixed' / 'clean'}: must be outside the input data "
                                 f"({tmp_path / 'mixed'})")
    with pytest.raises(ConfigError, match="must be outside the input data"):
        scrub_paths([str(data)], tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["in.jsonl", "mixed"]


def test_output_dir_that_is_a_file_is_one_line_error(tmp_path):
    data = write(tmp_path / "x.txt", ["患者张伟，男"])
    taken = write(tmp_path / "taken", ["not a folder"])
    result = run_medtune("data", "scrub", str(data), "--output_dir", str(taken))
    assert (result.returncode, result.stderr) == (2, f"medtune: error: --output_dir {taken}: is a file; give a "
                                                     "folder\n")


def test_two_inputs_with_the_same_file_name_keep_their_folders(tmp_path):
    """Mirrored as `data contamination --write_clean` mirrors: under the folder that holds every input."""
    first = write(tmp_path / "a" / "train.txt", ["患者张伟，男"]) if (tmp_path / "a").mkdir() is None else None
    second = write(tmp_path / "b" / "train.txt", ["患者李静，女"]) if (tmp_path / "b").mkdir() is None else None
    scrub_paths([str(first), str(second)], tmp_path / "out")
    assert {str(p.relative_to(tmp_path / "out")): p.read_text(encoding="utf-8")
            for p in (tmp_path / "out").rglob("*.txt")} == {"a/train.txt": "患者[姓名1]，男\n",
                                                             "b/train.txt": "患者[姓名1]，女\n"}


def test_bom_and_non_utf8_files(tmp_path):
    bom = tmp_path / "in" / "bom.txt"
    bom.parent.mkdir()
    bom.write_bytes("\ufeff患者张伟，电话13812345678\n".encode("utf-8"))
    scrub_paths([str(bom)], tmp_path / "out")
    assert (tmp_path / "out" / "bom.txt").read_text(encoding="utf-8") == "患者[姓名1]，电话[电话1]\n"
    gbk = tmp_path / "in" / "gbk.jsonl"
    gbk.write_bytes('{"text": "无"}\n'.encode() + '{"text": "患者张伟"}\n'.encode("gbk"))
    result = run_medtune("data", "scrub", str(gbk), "--output_dir", str(tmp_path / "out2"))
    assert (result.returncode, result.stderr) == (2, f"medtune: error: {gbk}:2: not valid UTF-8 (byte 0xbb at "
                                                     "column 11); re-save the file as UTF-8\n")
    assert not any((tmp_path / "out2").rglob("*"))


def test_report_and_output_hold_none_of_the_values(tmp_path, corpus):
    records = corpus[:200]
    data = write(tmp_path / "notes.jsonl", [{"text": "\n".join(text for text, _ in record)} for record in records])
    result = run_medtune("data", "scrub", str(data), "--output_dir", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    report_text = (tmp_path / "out" / REPORT_NAME).read_text(encoding="utf-8")
    scrubbed = (tmp_path / "out" / "notes.jsonl").read_text(encoding="utf-8")
    values = {text[s:e] for record in records for text, spans in record for s, e, kind in spans
              if not kind.startswith("lookalike:")}
    values = {v for v in values if not (v.isdigit() and len(v) < 6)}  # an age such as 95 may equal a count
    assert not [v for v in values if v in report_text or v in result.stdout]
    numbers = {v for record in records for text, spans in record for s, e, kind in spans
               if kind in ("phone", "id_card", "bank_card", "record_no", "email") for v in [text[s:e]]}
    assert not [v for v in numbers if v in scrubbed]
    report = json.loads(report_text)
    assert report["records"] == 200 and set(report["replaced"]) == set(KINDS)
    assert "\ntotal " in result.stdout and "200 records scrubbed" in result.stdout


def test_output_dir_is_required():
    result = run_medtune("data", "scrub", "notes.txt")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("medtune data scrub: error: the following arguments are "
                                                      "required: --output_dir")


def test_drug_and_finding_words_after_patient_are_not_names():
    """患者 followed by a drug, herb or finding that starts with a surname character stays, and is not spread."""
    assert Replacer().scrub_fields(["患者华法林抗凝治疗中", "嘱华法林3mg qd；华法林与阿司匹林合用出血风险增加"]) == \
        ["患者华法林抗凝治疗中", "嘱华法林3mg qd；华法林与阿司匹林合用出血风险增加"]
    texts = ["患者甘露醇125ml脱水", "患者利福平、异烟肼抗结核", "患者柴胡疏肝散加减", "患者米非司酮10mg qd",
             "患者舒张压偏高", "患者包块质硬", "患者诸症缓解", "患者戴眼镜", "患者莫西沙星0.4g qd"]
    assert Replacer().scrub_fields(texts) == texts
    # a name with a boundary after it is still found, and found again elsewhere in the record
    assert Replacer().scrub_fields(["患者张伟，男，58岁", "张伟服用华法林"]) == ["患者[姓名1]，男，58岁", "[姓名1]服用华法林"]
    # found without a boundary: replaced where found, not spread to the rest of the record
    assert Replacer().scrub_fields(["患者张伟头痛3天", "张伟服用华法林"]) == ["患者[姓名1]头痛3天", "张伟服用华法林"]


def test_full_width_digits_are_found():
    assert Replacer().scrub_fields(["电话：１３８１２３４５６７８，卡号６２２２０２１２３４５６７８９０１２８",
                                    "复诊请拨13812345678，身份证１１０１０５１９４９１２３１００２Ｘ"]) == \
        ["电话：[电话1]，卡号[银行卡号1]", "复诊请拨[电话1]，身份证[身份证号1]"]


def test_ids_and_integers_are_scrubbed(tmp_path):
    record = {"text": "患者张伟，电话13812345678", "mobile": 13812345678, "visits": 3, "weight": 61.5,
              "ok": True, "id": "张伟-13812345678", "messages_count": None}
    data = write(tmp_path / "in.jsonl", [record, {"text": "无", "id": "a-17"}])
    scrub_paths([str(data)], tmp_path / "out")
    assert [json.loads(line) for line in (tmp_path / "out" / "in.jsonl").read_text(encoding="utf-8").splitlines()] \
        == [{"text": "患者[姓名1]，电话[电话1]", "mobile": "[电话1]", "visits": 3, "weight": 61.5, "ok": True,
             "id": "[姓名1]-[电话1]", "messages_count": None}, {"text": "无", "id": "a-17"}]


def test_cleanup_after_a_failed_run_never_raises(tmp_path):
    """Cleanup runs in `finally`: an error there would replace the error that stopped the run."""
    from medtune.data.outputs import remove_quietly

    (tmp_path / "file").write_text("x", encoding="utf-8")
    assert remove_quietly(tmp_path / "file" / "out.txt.partial") is None  # NotADirectoryError, swallowed
    assert remove_quietly(tmp_path / "missing.partial") is None
    remove_quietly(tmp_path / "file")
    assert not (tmp_path / "file").exists()

"""`medtune data contamination`: planted evaluation items are found at their exact file:line, nothing else is."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys

import pytest

from medtune.cli import main as medtune_main
from medtune.data.contamination import EvalIndex, normalise

from .conftest import REPO

CMB = REPO / "data" / "eval" / "cmb"
TRAIN_FOLDERS = ("pretrain", "finetune", "reward")


def cmb_items() -> dict[str, dict]:
    items = {}
    for name in ("val.json", "test.json", "clin.json"):
        items.update({item["id"]: item for item in json.loads((CMB / name).read_text(encoding="utf-8"))})
    return items


# -- how an item is planted -------------------------------------------------------------------------------------

def verbatim(item: dict) -> str:
    """The item as an exam dump prints it: question, then `A. option` lines (a case: description, questions)."""
    if "QA_pairs" in item:
        return item["description"] + "\n" + "\n".join(pair["question"] for pair in item["QA_pairs"])
    return item["question"] + "\n" + "\n".join(f"{letter}. {text}" for letter, text in item["option"].items())


def edited(item: dict, old: str, new: str) -> str:
    """A few characters of the question changed (a typo, a synonym, a number)."""
    assert old in item["question"]
    return verbatim({**item, "question": item["question"].replace(old, new, 1)})


FULL_WIDTH = str.maketrans({c: chr(ord(c) + 0xFEE0) for c in "!(),.:;?0123456789ABCDEFG"})
HALF_WIDTH = str.maketrans({"，": ",", "；": ";", "：": ":", "（": "(", "）": ")", "？": "?"})


def reformatted(item: dict, style: int) -> str:
    """Re-typed: width of punctuation, letters and digits swapped, whitespace moved, options joined otherwise."""
    if "QA_pairs" in item:
        return (item["description"].translate(HALF_WIDTH).replace("，", " , ") + "  问题："
                + " / ".join(pair["question"].translate(HALF_WIDTH) for pair in item["QA_pairs"]))
    options = item["option"]
    if style == 0:  # full-width letters, digits and punctuation; options on one line as （Ａ）…
        joined = "　".join(f"({letter}){text}" for letter, text in options.items())
        return (item["question"] + "（ ）" + joined).translate(FULL_WIDTH)
    if style == 1:  # half-width punctuation, options without labels, separated by semicolons
        return item["question"].translate(HALF_WIDTH) + " ( ) " + "; ".join(options.values())
    return " ".join(item["question"]) + "\n" + "；".join(f"{letter}、{text}" for letter, text in options.items())


def plants(items: dict[str, dict]) -> dict[str, list[tuple[int, str, str]]]:
    """{training file: [(line it lands on, eval id, planted text)]}: 20 items, 7 verbatim, 7 edited, 6 re-typed."""
    return {
        "pretrain/internal_medicine.txt": [
            (3, "val-001", verbatim(items["val-001"])),
            (12, "val-002", edited(items["val-002"], "首选", "最佳")),
            (25, "test-001", reformatted(items["test-001"], 0)),
            (40, "clin-01", verbatim(items["clin-01"])),
            (58, "test-013", edited(items["test-013"], "最具", "最有")),
            (77, "val-011", reformatted(items["val-011"], 1)),
            (110, "test-004", verbatim(items["test-004"])),
        ],
        "finetune/medical_sharegpt_part1.jsonl": [
            (1, "val-004", verbatim(items["val-004"])),
            (30, "val-009", edited(items["val-009"], "膝关节痛", "腰部疼痛")),
            (31, "test-010", reformatted(items["test-010"], 2)),
            (64, "clin-02", ""),  # a whole consultation: see consultation() below
            (90, "val-013", reformatted(items["val-013"], 0)),
            (120, "test-002", edited(items["test-002"], "典型", "主要")),
            (173, "val-014", verbatim(items["val-014"])),
        ],
        "reward/medical_preference.jsonl": [
            (5, "val-006", verbatim(items["val-006"])),
            (50, "test-003", edited(items["test-003"], "通常", "一般")),
            (99, "test-005", reformatted(items["test-005"], 1)),
            (150, "val-012", verbatim(items["val-012"])),
            (200, "test-014", edited(items["test-014"], "首要且最关键", "第一步且最重要")),
            (231, "clin-03", reformatted(items["clin-03"], 0)),
        ],
    }


def consultation(case: dict) -> dict:
    """A CMB-Clin case as a ShareGPT conversation: the description with the first question, then each question
    answered in turn (the references' solutions are the replies)."""
    turns = []
    for i, pair in enumerate(case["QA_pairs"]):
        asked = case["description"] + "\n" + pair["question"] if i == 0 else pair["question"]
        turns += [{"from": "human", "value": asked}, {"from": "gpt", "value": pair["solution"]}]
    return {"conversations": turns}


def as_record(relative: str, item_id: str, text: str, items: dict) -> str:
    """One line of the training file holding `text` in that file's format."""
    if relative.endswith(".txt"):
        return text.replace("\n", " ")
    if relative.startswith("finetune"):
        record = consultation(items[item_id]) if item_id.startswith("clin") else {
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": "答案是C。"}]}
    else:
        record = {"system": "", "history": [], "question": text, "response_chosen": "正确答案及解析如下……",
                  "response_rejected": "不知道。"}
    return json.dumps(record, ensure_ascii=False)


@pytest.fixture(scope="module")
def planted_train(tmp_path_factory):
    """A copy of the bundled training data with the 20 items planted at their lines."""
    root = tmp_path_factory.mktemp("planted") / "train"
    for folder in TRAIN_FOLDERS:
        shutil.copytree(REPO / "data" / folder, root / folder)
    items = cmb_items()
    for relative, planted in plants(items).items():
        path = root / relative
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        for line, item_id, text in planted:  # ascending lines: each insert lands exactly where it says
            lines.insert(line - 1, as_record(relative, item_id, text, items) + "\n")
        path.write_text("".join(lines), encoding="utf-8")
    return root


EXPECTED = {  # eval id -> the planted training record (relative to the training root)
    "val-001": "pretrain/internal_medicine.txt:3", "val-002": "pretrain/internal_medicine.txt:12",
    "test-001": "pretrain/internal_medicine.txt:25", "clin-01": "pretrain/internal_medicine.txt:40",
    "test-013": "pretrain/internal_medicine.txt:58", "val-011": "pretrain/internal_medicine.txt:77",
    "test-004": "pretrain/internal_medicine.txt:110",
    "val-004": "finetune/medical_sharegpt_part1.jsonl:1", "val-009": "finetune/medical_sharegpt_part1.jsonl:30",
    "test-010": "finetune/medical_sharegpt_part1.jsonl:31", "clin-02": "finetune/medical_sharegpt_part1.jsonl:64",
    "val-013": "finetune/medical_sharegpt_part1.jsonl:90", "test-002": "finetune/medical_sharegpt_part1.jsonl:120",
    "val-014": "finetune/medical_sharegpt_part1.jsonl:173",
    "val-006": "reward/medical_preference.jsonl:5", "test-003": "reward/medical_preference.jsonl:50",
    "test-005": "reward/medical_preference.jsonl:99", "val-012": "reward/medical_preference.jsonl:150",
    "test-014": "reward/medical_preference.jsonl:200", "clin-03": "reward/medical_preference.jsonl:231",
}


@pytest.fixture(scope="module")
def planted_run(planted_train, tmp_path_factory):
    out = tmp_path_factory.mktemp("contamination")
    argv = ["data", "contamination", "--train", *(str(planted_train / f) for f in TRAIN_FOLDERS),
            "--eval", str(CMB), "--report", str(out / "report.json"), "--write_clean", str(out / "clean")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert medtune_main(argv) == 0
    (out / "printed.txt").write_text(printed.getvalue(), encoding="utf-8")
    return json.loads((out / "report.json").read_text(encoding="utf-8")), out / "clean"


def test_printed_table_lists_each_item_with_overlap_and_record(planted_run, planted_train):
    _, clean = planted_run
    lines = (clean.parent / "printed.txt").read_text(encoding="utf-8").splitlines()
    rows = [line.split() for line in lines if line.startswith(("clin-", "test-", "val-"))]
    assert [(row[0], row[1], row[2].removeprefix(f"{planted_train}/")) for row in rows][:3] == [
        ("clin-01", "1.000", "pretrain/internal_medicine.txt:40"),
        ("clin-02", "0.916", "finetune/medical_sharegpt_part1.jsonl:64"),
        ("clin-03", "0.968", "reward/medical_preference.jsonl:231")]
    assert len(rows) == 20
    assert ("20 of 328 evaluation items contaminated (overlap >= 0.3 of their 13-grams) by 20 of 777 training "
            "records in 6 files") in lines
    assert f"wrote {clean}: 757 records kept, 20 removed" in lines


def test_every_planted_item_is_found_at_its_line_and_nothing_else(planted_run, planted_train):
    report, _ = planted_run
    found = {item["id"]: [m["train"].removeprefix(f"{planted_train}/") for m in item["matches"]]
             for item in report["contaminated"]}
    assert found == {item_id: [where] for item_id, where in EXPECTED.items()}
    assert {p[1] for planted in plants(cmb_items()).values() for p in planted} == set(EXPECTED)
    assert (report["contaminated_items"], report["contaminated_records"]) == (20, 20)
    assert (report["train_files"], report["train_records"]) == (6, 757 + 20)
    assert report["eval_items"] == 110 + 210 + 8 and report["eval_items_too_short"] == []
    # Verbatim and re-typed copies overlap fully (normalisation undoes width, whitespace and labels); each changed
    # character hides up to 13 n-grams; the consultation interleaves answers between the case's questions.
    overlaps = {item["id"]: item["matches"][0]["overlap"] for item in report["contaminated"]}
    assert {i: v for i, v in overlaps.items() if v < 1} == {
        "clin-02": 0.9159, "clin-03": 0.9676, "test-002": 0.8551, "test-003": 0.7021, "test-013": 0.8971,
        "test-014": 0.55, "val-002": 0.7778, "val-009": 0.717}


def test_clean_copy_is_the_bundled_data_again(planted_run):
    """The planted records are exactly what --write_clean removes: the copy equals the bundled files byte for byte."""
    report, clean = planted_run
    for folder in TRAIN_FOLDERS:
        originals = sorted(p.relative_to(REPO / "data") for p in (REPO / "data" / folder).rglob("*") if p.is_file())
        written = sorted(p.relative_to(clean) for p in (clean / folder).rglob("*") if p.is_file())
        assert written == originals
        for relative in originals:
            assert (clean / relative).read_bytes() == (REPO / "data" / relative).read_bytes(), relative
    assert report["clean"]["records_removed"] == 20 and report["clean"]["records_kept"] == 757
    assert {k.rsplit("/", 2)[-2] + "/" + k.rsplit("/", 1)[-1]: v
            for k, v in report["clean"]["removed_per_file"].items()} == {
        "pretrain/internal_medicine.txt": 7, "finetune/medical_sharegpt_part1.jsonl": 7,
        "reward/medical_preference.jsonl": 6}


def test_normalisation_ignores_width_punctuation_whitespace_and_option_labels():
    assert normalise("男，58岁。\nA. 前间壁　B、广泛前壁") == normalise("男,５８岁（Ａ）前间壁 (B)广泛前壁") == "男58岁前间壁广泛前壁"
    assert normalise("HbA1c 与 aVF 导联、维生素K1") == "hba1c与avf导联维生素k1"  # letters inside words stay


def test_overlap_is_the_share_of_the_items_ngrams_in_the_record():
    index = EvalIndex(n=4)
    index.add("eval.json", "q1", "eval.json:2", "一二三四五六七八")  # 5 distinct 4-grams
    index.add("eval.json", "q2", "eval.json:9", "甲乙丙丁")  # 1
    assert index.overlaps("零一二三四五，别的") == {0: 2 / 5}  # 一二三四, 二三四五
    assert index.overlaps("甲乙丙丁 五六七八") == {0: 1 / 5, 1: 1.0}
    assert index.overlaps("毫无关系的一段文字") == {}


@pytest.mark.parametrize("indent, line", [(1, 5), (None, 1)])
def test_a_json_array_training_file_is_written_without_the_contaminated_element(tmp_path, indent, line, capsys):
    """Elements are dropped by their index: a compact array (json.dump without indent) has every one on line 1, so
    the printed table names the element too."""
    items = cmb_items()
    records = [{"text": "高血压患者应低盐饮食，每日食盐摄入量不超过5克。"}, {"text": verbatim(items["test-011"])},
               {"text": "糖尿病患者应定期监测血糖。"}]
    train = tmp_path / "train" / "docs.json"
    train.parent.mkdir()
    train.write_text(json.dumps(records, ensure_ascii=False, indent=indent), encoding="utf-8")
    argv = ["data", "contamination", "--train", str(train), "--eval", str(CMB / "test.json"), "--report",
            str(tmp_path / "r.json"), "--write_clean", str(tmp_path / "clean")]
    assert medtune_main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))
    assert [(c["id"], c["matches"][0]["train"], c["matches"][0]["record"]) for c in report["contaminated"]] == [
        ("test-011", f"{train}:{line}", 1)]
    rows = [row.split() for row in capsys.readouterr().out.splitlines() if row.startswith("test-")]
    assert rows == [["test-011", "1.000", f"{train}:{line}[#1]", str(CMB / "test.json")]]
    assert (report["contaminated_records"], report["clean"]["records_removed"], report["clean"]["records_kept"]) == \
        (1, 1, 2)
    assert json.loads((tmp_path / "clean" / "docs.json").read_text(encoding="utf-8")) == [records[0], records[2]]


def test_report_path_that_is_a_folder_stops_before_any_work(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("一段文字\n", encoding="utf-8")
    (tmp_path / "reports").mkdir()
    assert run_cli(capsys, "data", "contamination", "--train", str(tmp_path / "train"), "--eval", str(CMB),
                   "--report", str(tmp_path / "reports"), "--write_clean", str(tmp_path / "clean")) == (2, [
        f"medtune: error: --report {tmp_path}/reports: is a folder; give a file name"])
    assert not (tmp_path / "clean").exists()


def run_cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """`medtune ARGV` in this process: (exit code, stderr lines)."""
    code = medtune_main(list(argv))
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_training_record_is_one_line_and_nothing_is_written(tmp_path, capsys):
    train = tmp_path / "chats.jsonl"
    train.write_text('{"conversations": [{"from": "human", "value": "头痛怎么办"}, {"from": "gpt", "value": "休息"}]}\n'
                     '{"conversations": [{"from": "doctor", "value": "你好"}]}\n', encoding="utf-8")
    assert run_cli(capsys, "data", "contamination", "--train", str(train), "--eval", str(CMB / "val.json"),
                   "--report", str(tmp_path / "r.json"), "--write_clean", str(tmp_path / "clean")) == (2, [
        f"medtune: error: {train}:2: conversations[0].from: unknown role 'doctor' (use one of assistant, gpt, human, "
        "system, user)"])
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "clean").exists()


def test_training_data_as_evaluation_input_is_refused(tmp_path, capsys):
    preference = REPO / "data" / "reward" / "medical_preference.jsonl"
    assert run_cli(capsys, "data", "contamination", "--train", str(REPO / "data" / "pretrain"), "--eval",
                   str(preference), "--report", str(tmp_path / "r")) == (2, [
        f"medtune: error: {preference}:1: PreferencePair is not an evaluation item (expected CMB-Exam items or "
        "CMB-Clin cases)"])


def test_clean_copy_inside_the_training_data_is_refused(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("一段文字\n", encoding="utf-8")
    assert run_cli(capsys, "data", "contamination", "--train", str(tmp_path / "train"), "--eval", str(CMB),
                   "--write_clean", str(tmp_path / "train" / "clean")) == (2, [
        f"medtune: error: --write_clean {tmp_path}/train/clean: must be outside the input data "
        f"({tmp_path}/train)"])


def test_throughput_benchmark_finds_the_planted_records_on_every_path():
    result = subprocess.run([sys.executable, "benchmarks/contamination_throughput.py", "--records", "2000"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows[0]["planted"] == 20
    assert [(r["path"], r["records"], r["matches"]) for r in rows[1:5]] == [
        ("read_only", 2000, 0), ("numpy_batch", 2000, 20), ("builtin_hash", 2000, 20), ("rolling_hash", 2000, 20)]
    assert rows[-1]["records_per_s"] > 0


def test_a_config_file_sets_options_while_the_required_paths_come_from_the_command_line(tmp_path):
    """`--config c.yaml` with only `threshold` (train and eval are required options given on the command line): the
    config's value is used. Before the loader checked entries without the required options, every entry failed."""
    items = cmb_items()
    train = tmp_path / "train.jsonl"
    # a lightly edited copy: its overlap lies between the default threshold and the config's
    edited = verbatim(items["test-011"])
    train.write_text(json.dumps({"text": edited[: len(edited) // 3]}, ensure_ascii=False) + "\n", encoding="utf-8")
    argv = ["data", "contamination", "--train", str(train), "--eval", str(CMB / "test.json")]

    def contaminated(*extra: str) -> list[str]:
        report = tmp_path / f"r{len(extra)}.json"
        assert medtune_main([*argv, "--report", str(report), *extra]) == 0
        return [c["id"] for c in json.loads(report.read_text(encoding="utf-8"))["contaminated"]]

    config = tmp_path / "c.yaml"
    config.write_text("threshold: 0.05\n", encoding="utf-8")
    assert contaminated() == []  # a third of the item stays under the default 0.3
    assert contaminated("--config", str(config)) == ["test-011"]

"""Malformed input of every kind stops the run with `file:line: field: message` before training (exit code 2)."""

import json

import pytest

from medtune.data.loading import load_records, require_records
from medtune.errors import DataError

from .conftest import REPO, run_medtune


def jsonl(*records) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records).encode()


GOOD_CHAT = {"conversations": [{"from": "human", "value": "头痛怎么办？"}, {"from": "gpt", "value": "多休息。"}]}
GOOD_CHAT_MESSAGES = [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "多休息。"}]
GOOD_PAIR = {"system": "", "history": [], "question": "孕妇能用多西环素吗？", "response_chosen": "不建议。",
             "response_rejected": "可以。"}

GOOD_ITEM = {"id": "t-1", "exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "药理学",
             "question": "妊娠期应避免使用的抗菌药物是", "option": {"A": "阿莫西林", "B": "头孢呋辛", "C": "多西环素",
                                                                    "D": "阿奇霉素"},
             "answer": "C", "question_type": "单项选择题"}

CASES = {
    # name: (kind, file name, content, expected "line: field: message" fragment)
    "text-truncated-json": ("text", "a.jsonl", jsonl({"text": "高血压"}, '{"text": "糖尿'), ":2: invalid JSON"),
    "text-missing-field": ("text", "a.jsonl", jsonl({"text": "高血压"}, {"content": "x"}), ":2: text: missing"),
    "text-mistyped": ("text", "a.jsonl", jsonl({"text": "ok"}, {"text": ["a"]}), ":2: text: expected a string"),
    "text-empty": ("text", "a.jsonl", jsonl({"text": "ok"}, {"text": "   "}), ":2: text: empty"),
    "text-encoding": ("text", "a.txt", "第一行\n".encode() + "第二行\n".encode("gbk"), ":2: not valid UTF-8"),
    "sft-missing-conversations": ("sft", "c.jsonl", jsonl(GOOD_CHAT, {"conversation": []}), ":2: conversations: missing"),
    "sft-unknown-role": ("sft", "c.jsonl", jsonl(GOOD_CHAT, {"conversations": [{"from": "doctor", "value": "x"}]}),
                         ":2: conversations[0].from: unknown role 'doctor'"),
    "sft-empty-answer": ("sft", "c.jsonl", jsonl({"conversations": [{"from": "human", "value": "问"},
                                                                     {"from": "gpt", "value": ""}]}),
                         ":1: conversations[1].value: empty"),
    "sft-two-user-turns": ("sft", "c.jsonl", jsonl({"conversations": [{"from": "human", "value": "问1"},
                                                                       {"from": "human", "value": "问2"},
                                                                       {"from": "gpt", "value": "答"}]}),
                           ":1: conversations[1]: expected an assistant turn here, got two user turns in a row"),
    "sft-bad-json": ("sft", "c.jsonl", jsonl(GOOD_CHAT, "{not json"), ":2: invalid JSON"),
    "pref-missing-rejected": ("preference", "p.jsonl", jsonl(GOOD_PAIR, {k: v for k, v in GOOD_PAIR.items()
                                                                          if k != "response_rejected"}),
                              ":2: response_rejected: missing"),
    "pref-bad-history": ("preference", "p.jsonl", jsonl(dict(GOOD_PAIR, history=[["只有问题"]])),
                         ":1: history[0]: expected a [question, answer] pair"),
    "exam-answer-not-an-option": ("exam", "e.json", json.dumps([dict(GOOD_ITEM), dict(GOOD_ITEM, answer="E")],
                                                               ensure_ascii=False, indent=1).encode(),
                                  ":17: answer: 'E' names an option that does not exist"),
    "exam-single-with-two-answers": ("exam", "e.jsonl", jsonl(GOOD_ITEM, dict(GOOD_ITEM, answer="AB")),
                                     ":2: answer: a 单项选择题 has exactly one answer"),
    "exam-bad-question-type": ("exam", "e.jsonl", jsonl(dict(GOOD_ITEM, question_type="判断题")),
                               ":1: question_type: expected 单项选择题 or 多项选择题"),
    "clin-missing-solution": ("clin", "c.jsonl", jsonl({"id": 1, "title": "t", "description": "d",
                                                         "QA_pairs": [{"question": "q"}]}),
                              ":1: QA_pairs[0].solution: missing"),
    "json-array-line-numbers": ("text", "a.json", b'[\n  {"text": "a"},\n  {"text": ""}\n]\n',
                                ":3: text: empty"),
    # A .json file is one array, parsed whole: what follows it, or a missing comma, is an error at its line.
    "json-array-then-array": ("text", "a.json", b'[{"text": "a"},\n {"text": "b"}]\n[{"text": "c"}]\n',
                              ":3: invalid JSON: Extra data (column 1) after the end of the array"),
    "json-array-then-jsonl": ("text", "a.json", b'[{"text": "a"}]\n{"text": "b"}\n{"text": "c"}\n',
                              ":2: invalid JSON: Extra data"),
    "json-array-then-garbage": ("sft", "c.json", b"[" + jsonl(GOOD_CHAT) + b"]\n\n]}\n", ":4: invalid JSON: Extra data"),
    "json-array-missing-comma": ("text", "a.json", b'[\n{"text": "a"},\n{"text": "b"}\n{"text": "c"}\n]\n',
                                 ":4: invalid JSON: Expecting ',' delimiter"),
    # A file with no record at all is a mistake, not an input to skip.
    "empty-file": ("text", "a.txt", b"", ": no records: the file is empty"),
    "whitespace-only-file": ("sft", "c.jsonl", b"\n \n\t\n", ": no records: the file is empty"),
    "empty-json-array": ("preference", "p.json", b"[ ]\n", ": no records: the file is empty"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_records_name_file_line_and_field(tmp_path, name):
    kind, filename, content, expected = CASES[name]
    path = tmp_path / filename
    path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_records(tmp_path, kind)
    message = str(caught.value)
    assert f"{path}{expected}" in message, message


def test_missing_conversations_key_in_a_sharegpt_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(jsonl(GOOD_CHAT, {"messages_": 1, "id": 3}))
    with pytest.raises(DataError, match=r"c\.jsonl:2: conversations: missing"):
        load_records(tmp_path, "sft")


def test_every_problem_is_reported_not_just_the_first(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl({"text": ""}, {"text": "ok"}, "{oops", {"text": 1}))
    with pytest.raises(DataError) as caught:
        load_records(tmp_path, "text")
    assert [p.line for p in caught.value.problems] == [1, 3, 4]


def test_wrong_kind_of_file_is_named(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(jsonl(GOOD_CHAT))
    with pytest.raises(DataError, match="holds sharegpt records, which are for medtune sft, not medtune pt"):
        load_records(tmp_path, "text")


def test_formats_convert_to_one_internal_shape(tmp_path):
    (tmp_path / "openai.jsonl").write_bytes(jsonl({"messages": [{"role": "user", "content": "问"},
                                                                {"role": "assistant", "content": "答"}]}))
    (tmp_path / "alpaca.jsonl").write_bytes(jsonl({"instruction": "问", "input": "", "output": "答"}))
    (tmp_path / "sharegpt.jsonl").write_bytes(jsonl({"conversations": [{"from": "human", "value": "问"},
                                                                       {"from": "gpt", "value": "答"}]}))
    records, reports = load_records(tmp_path, "sft")
    assert {r.format for r in reports} == {"openai", "alpaca", "sharegpt"}
    assert all(r.messages == [{"role": "user", "content": "问"}, {"role": "assistant", "content": "答"}]
               for r in records)
    assert records[0].source.endswith(":1")


@pytest.mark.parametrize("kind, folder", [("text", "pretrain"), ("sft", "finetune"), ("preference", "reward")])
def test_bundled_data_is_valid(kind, folder):
    records, _ = load_records(REPO / "data" / folder, kind)
    assert records


def test_pt_stops_before_training_with_exit_code_2(tmp_path, glm4_dir):
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "ok.txt").write_text("高血压需要长期管理。\n", encoding="utf-8")
    (data / "bad.jsonl").write_bytes(jsonl({"text": "糖尿病"}, {"text": ""}))
    out = tmp_path / "out"
    result = run_medtune("pt", "--model_name_or_path", str(glm4_dir), "--train_file_dir", str(data),
                         "--output_dir", str(out), "--max_steps", "2", "--report_to", "none")
    assert result.returncode == 2, result.stderr
    assert f"medtune: error: {data / 'bad.jsonl'}:2: text: empty" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "adapter_model.safetensors").exists()


def test_data_check_cli(tmp_path):
    good = run_medtune("data", "check", "data/", "--no_tokens")
    assert good.returncode == 0, good.stderr
    assert "0 problems" in good.stdout
    (tmp_path / "bad.jsonl").write_bytes(jsonl(GOOD_CHAT, {"conversations": [{"from": "human", "value": "x"}]}))
    bad = run_medtune("data", "check", str(tmp_path), "--no_tokens")
    assert bad.returncode == 2
    assert f"{tmp_path / 'bad.jsonl'}:2: conversations: must end with an assistant turn" in bad.stderr


def test_json_array_records_keep_the_line_they_start_on(tmp_path):
    records = [{"text": "a"}, {"text": "b\nc"}, {"text": "d"}]
    (tmp_path / "a.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    documents, _ = load_records(tmp_path / "a.json", "text")
    assert [d.source.rsplit(":", 1)[1] for d in documents] == ["2", "5", "8"]
    assert [d.text for d in documents] == ["a", "b\nc", "d"]


def test_require_records_names_the_file_the_dropped_records_came_from(tmp_path):
    (tmp_path / "c.jsonl").write_bytes(jsonl(GOOD_CHAT, GOOD_CHAT))
    conversations, _ = load_records(tmp_path, "sft")
    require_records(conversations, conversations, "unused")
    with pytest.raises(DataError) as caught:
        require_records([], conversations, "all 2 dropped")
    assert str(caught.value) == f"{tmp_path / 'c.jsonl'}: all 2 dropped"


def test_a_corpus_shorter_than_one_block_is_refused_only_with_remainder_drop(glm4_dir):
    from medtune.config import PretrainDataArguments
    from medtune.data.pretrain import require_one_block
    from medtune.data.records import TextDocument
    from medtune.models.loader import load_tokenizer

    tokenizer = load_tokenizer(str(glm4_dir))
    documents = [TextDocument("高血压。", "a.txt:1")]
    require_one_block(documents, tokenizer, PretrainDataArguments(block_size=64, remainder="pad"))
    require_one_block(documents, tokenizer, PretrainDataArguments(block_size=2, remainder="drop"))
    tokens = len(tokenizer("高血压。", add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(DataError, match=rf"^a\.txt: 1 documents hold {tokens} tokens, fewer than one block of 64"):
        require_one_block(documents, tokenizer, PretrainDataArguments(block_size=64, remainder="drop"))


def test_streaming_reads_an_upper_case_txt_file_as_text(tmp_path, glm4_dir):
    from medtune.config import PretrainDataArguments
    from medtune.data.blocks import group_into_blocks, tokenize_texts
    from medtune.data.pretrain import stream_block_dataset
    from medtune.models.loader import load_tokenizer

    lines = ["高血压需要长期管理。", "糖尿病患者应监测血糖。"]
    (tmp_path / "NOTES.TXT").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tokenizer = load_tokenizer(str(glm4_dir))
    streamed = list(stream_block_dataset(PretrainDataArguments(train_file_dir=str(tmp_path), block_size=8,
                                                               streaming=True), tokenizer))
    expected, _ = group_into_blocks(tokenize_texts(lines, tokenizer), 8, "pad", tokenizer.pad_token_id)
    assert [b["input_ids"] for b in streamed] == [b["input_ids"] for b in expected]


def pretraining_folder(folder):
    (folder / "notes.txt").write_text("高血压需要长期管理。\n\n  糖尿病患者应监测血糖。  \n", encoding="utf-8")
    (folder / "docs.jsonl").write_bytes(jsonl({"text": "  冠心病患者应戒烟。"}, {"text": "哮喘患者应随身携带吸入剂。\n"}))
    (folder / "array.json").write_text(json.dumps([{"text": "痛风患者应少吃海鲜。"}, {"text": "贫血应查明原因。"}],
                                                  ensure_ascii=False), encoding="utf-8")  # one line
    return folder


def test_streaming_reads_every_format_into_the_documents_a_normal_run_reads(tmp_path, glm4_dir):
    from medtune.config import PretrainDataArguments
    from medtune.data.blocks import group_into_blocks, tokenize_texts
    from medtune.data.pretrain import stream_block_dataset
    from medtune.models.loader import load_tokenizer

    tokenizer = load_tokenizer(str(glm4_dir))
    folder = pretraining_folder(tmp_path)
    streamed = list(stream_block_dataset(PretrainDataArguments(train_file_dir=str(folder), block_size=8,
                                                               streaming=True), tokenizer))
    documents = [d.text for d in load_records(folder, "text")[0]]
    assert documents[:2] == ["痛风患者应少吃海鲜。", "贫血应查明原因。"]  # array.json, docs.jsonl, notes.txt
    assert documents[2:4] == ["  冠心病患者应戒烟。", "哮喘患者应随身携带吸入剂。\n"] and len(documents) == 6
    expected, _ = group_into_blocks(tokenize_texts(documents, tokenizer), 8, "pad", tokenizer.pad_token_id)
    assert [b["input_ids"] for b in streamed] == [b["input_ids"] for b in expected]


def test_streaming_validation_lists_the_problems_a_normal_run_lists_in_line_order(tmp_path):
    from medtune.data.pretrain import validate_stream_sources

    # line 1's format is known only at line 3, so its problem is found after line 2's: listed by line anyway
    (tmp_path / "a.jsonl").write_bytes(b'{"title": "x"}\nnot json\n{"text": "ok"}\n')
    (tmp_path / "b.txt").write_bytes("正常的一行\n".encode() + b"\xff\xfe bad\n")
    with pytest.raises(DataError) as streamed:
        validate_stream_sources(str(tmp_path))
    with pytest.raises(DataError) as loaded:
        load_records(tmp_path, "text")
    assert str(streamed.value) == str(loaded.value)
    assert str(streamed.value).splitlines() == [
        f"{tmp_path / 'a.jsonl'}:1: text: missing",
        f"{tmp_path / 'a.jsonl'}:2: invalid JSON: Expecting value (column 1)",
        f"{tmp_path / 'b.txt'}:2: not valid UTF-8 (byte 0xff at column 1); re-save the file as UTF-8"]


def test_streaming_validation_keeps_no_file_in_memory(tmp_path):
    """A streamed corpus may be larger than memory; so may one of its files."""
    import tracemalloc

    from medtune.data.pretrain import validate_stream_sources

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"第{i}篇：高血压患者应低盐饮食，每日食盐不超过5克。\n" for i in range(20000)),
                      encoding="utf-8")  # 1.5 MB; its 20,000 documents held at once would take 6 MB
    tracemalloc.start()
    try:
        assert validate_stream_sources(str(tmp_path)) == [corpus]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200_000


def test_data_check_counts_duplicates_with_their_lines(tmp_path):
    other = {"conversations": [{"from": "human", "value": "发热怎么办？"}, {"from": "gpt", "value": "多喝水。"}]}
    (tmp_path / "a.jsonl").write_bytes(jsonl(GOOD_CHAT, other, GOOD_CHAT))
    (tmp_path / "b.jsonl").write_bytes(jsonl(other))
    result = run_medtune("data", "check", str(tmp_path), "--no_tokens")
    assert result.returncode == 0, result.stderr
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert (f"warning: 2 duplicated records (each equal to an earlier one): {a}:3 = {a}:1, {b}:1 = {a}:2"
            in result.stdout)
    assert "2 files, 4 valid records, 2 duplicated, 0 problems" in result.stdout


def test_data_check_measures_with_the_training_template(tmp_path, glm4_dir):
    from medtune.data.check import check_paths
    from medtune.models.loader import load_chat_template, load_tokenizer

    (tmp_path / "c.jsonl").write_bytes(jsonl(GOOD_CHAT))
    tokenizer = load_tokenizer(str(glm4_dir))
    for name in (None, "vicuna"):
        template = load_chat_template(str(glm4_dir), tokenizer, name)
        expected = len(template.encode(GOOD_CHAT_MESSAGES).input_ids)
        cli = run_medtune("data", "check", str(tmp_path), "--tokenizer_name_or_path", str(glm4_dir),
                          *(("--template", name) if name else ()))
        assert cli.returncode == 0, cli.stderr
        assert f"tokens p50={expected} p90={expected} p99={expected} max={expected}" in cli.stdout
        assert check_paths([str(tmp_path)], None, template)[2][0].messages == GOOD_CHAT_MESSAGES
    own = load_chat_template(str(glm4_dir), tokenizer, None).encode(GOOD_CHAT_MESSAGES).input_ids
    vicuna = load_chat_template(str(glm4_dir), tokenizer, "vicuna").encode(GOOD_CHAT_MESSAGES).input_ids
    assert own != vicuna  # the option changes what is measured

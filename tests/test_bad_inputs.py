"""Every kind of bad input x every command that reads it (issue 15's table, row by row).

The promise: exit code 2, one `medtune: error:` line per problem naming the file (and the line where there is
one), no traceback, and nothing written -- the watched output folder is absent or byte-for-byte as it was. Rows whose
right answer is a behaviour rather than an error (a re-run that must recompute, a resume whose loss must match)
carry their own `check`.

To add a reader or a command: append a `Case` to CASES. Placeholders in args and expected text: {tmp} (this
case's folder), {model} (tiny GLM-4), {qwen} (tiny Qwen2: same hidden size, other family), {bigger} (a GLM-4 of
another size), {adapter} (a finished pt LoRA adapter on {model}), {finished} (the same run's folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import REPO, run_medtune

pytestmark = pytest.mark.slow  # ~70 CLI runs on tiny models: a few minutes on 2 cores



# -- inputs ---------------------------------------------------------------------------------------------------

def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def jsonl(records) -> bytes:
    return "".join(dumps(r) + "\n" for r in records).encode()


def array(records) -> str:
    return json.dumps(records, ensure_ascii=False, indent=1) + "\n"


def lines(text: str) -> int:
    return text.count("\n")


DOCS = [{"text": f"第{i}段：高血压患者需要长期随访，监测血压并调整用药。"} for i in range(6)]
CHATS = [{"conversations": [{"from": "human", "value": f"头痛第{i}天怎么办？"}, {"from": "gpt", "value": "多休息，必要时就医。"}]}
         for i in range(6)]
PAIRS = [{"system": "", "history": [], "question": f"孕妇能用多西环素吗？（{i}）", "response_chosen": "不建议，可能影响胎儿牙齿和骨骼。",
          "response_rejected": "可以放心用。"} for i in range(6)]
ITEMS = [{"id": f"t-{i}", "exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "药理学",
          "question": f"第{i}题：妊娠期应避免使用的抗菌药物是",
          "option": {"A": "阿莫西林", "B": "头孢呋辛", "C": "多西环素", "D": "阿奇霉素"}, "answer": "C",
          "question_type": "单项选择题"} for i in range(20)]
TEST_ITEMS = [{k: v for k, v in item.items() if k != "answer"} for item in ITEMS]
KEYS = [{"id": item["id"], "exam_type": item["exam_type"], "exam_class": item["exam_class"], "answer": "C"}
        for item in ITEMS]
PREDICTIONS = [{"id": item["id"], "model_answer": "C" if i % 2 else "A"} for i, item in enumerate(ITEMS)]


def after_array(records, tail: str) -> tuple[bytes, int]:
    """A .json array followed by `tail`, and the line the tail starts on (where the parser must stop)."""
    text = array(records)
    return (text + tail).encode(), lines(text) + 1


def missing_comma(records) -> tuple[bytes, int]:
    """An array with no comma between its last two records, and the line of the record after the gap."""
    body = ",\n".join(dumps(r) for r in records[:-1]) + "\n" + dumps(records[-1])
    return f"[\n{body}\n]\n".encode(), len(records) + 1


TWO_ARRAYS, TWO_ARRAYS_LINE = after_array(DOCS[:3], array(DOCS[3:]))
THEN_JSONL, THEN_JSONL_LINE = after_array(DOCS[:3], jsonl(DOCS[3:]).decode())
THEN_GARBAGE, THEN_GARBAGE_LINE = after_array(DOCS, "这不是 JSON\n")
NO_COMMA, NO_COMMA_LINE = missing_comma(DOCS)
CHATS_THEN_JSONL, CHATS_THEN_JSONL_LINE = after_array(CHATS[:3], jsonl(CHATS[3:]).decode())
PAIRS_NO_COMMA, PAIRS_NO_COMMA_LINE = missing_comma(PAIRS)
ITEMS_THEN_GARBAGE, ITEMS_THEN_GARBAGE_LINE = after_array(TEST_ITEMS, "]\n")
KEYS_TWO_ARRAYS, KEYS_TWO_ARRAYS_LINE = after_array(KEYS[:10], array(KEYS[10:]))
LONG_CHATS = [{"conversations": [{"from": "human", "value": "反复头痛，" * 60}, {"from": "gpt", "value": "请就医。"}]}] * 3
SAME_PAIRS = [dict(p, response_rejected=p["response_chosen"]) for p in PAIRS]


# -- commands -------------------------------------------------------------------------------------------------

TRAIN = ("--model_name_or_path", "{model}", "--train_file_dir", "{tmp}/data", "--output_dir", "{tmp}/out",
         "--max_steps", "1", "--report_to", "none", "--validation_split_percentage", "0")
CHECK = ("data", "check", "{tmp}/data", "--no_tokens")
PT = ("pt", *TRAIN, "--block_size", "32")
SFT = ("sft", *TRAIN, "--model_max_length", "64")
DPO = ("dpo", *TRAIN, "--max_length", "64")
EXAM = ("eval", "cmb-exam", "--model_name_or_path", "{model}", "--data_dir", "{tmp}/cmb", "--output_dir", "{tmp}/out")
SCORE = ("eval", "cmb-score", "--predictions", "{tmp}/pred.json", "--truth", "{tmp}/truth.json", "--output_dir",
         "{tmp}/out")
SHORT_PIPELINE = ("--skip", "sft", "dpo", "eval", "--pt.max_steps", "2", "--pt.eval_steps", "2", "--pt.save_steps", "2",
                  "--pt.block_size", "32")
PIPELINE = ("pipeline", "--model_name_or_path", "{model}", "--pt.train_file_dir", "{tmp}/data", "--output_dir",
            "{tmp}/out", *SHORT_PIPELINE)
FINISHED_PIPELINE = tuple(arg.replace("{tmp}/data", "{corpus}") for arg in PIPELINE)  # as the env's pipeline ran


@dataclass
class Case:
    id: str
    args: tuple[str, ...]
    files: dict[str, bytes] = field(default_factory=dict)  # relative path under {tmp} -> content
    expect: tuple[str, ...] = ()  # every one of these is in the single error line
    watch: str | None = "out"  # folder under {tmp} that must be left absent or unchanged
    prepare: Callable | None = None  # prepare(tmp, env): set the scene (a finished run, a cut file, ...)
    check: Callable | None = None  # check(result, tmp, env): a behaviour row's own assertion
    fault: str | None = None  # "enospc": every safetensors save fails with "No space left on device"
    may_leave: frozenset[str] = frozenset()  # files a run that had started may leave in a fresh watched folder


def data(name: str, content: bytes) -> dict[str, bytes]:
    return {f"data/{name}": content}


def cmb(test: bytes, answers: bytes | None = None) -> dict[str, bytes]:
    files = {"cmb/test.json": test}
    if answers is not None:
        files["cmb/test_answers.json"] = answers
    return files


def score_files(predictions: bytes, truth: bytes) -> dict[str, bytes]:
    return {"pred.json": predictions, "truth.json": truth}


GOOD_TEXT = data("good.jsonl", jsonl(DOCS))


# -- behaviour rows --------------------------------------------------------------------------------------------

def copy_finished(tmp: Path, env: dict) -> None:
    shutil.copytree(env["finished"], tmp / "out", ignore=shutil.ignore_patterns("checkpoint-*", "runs"))


def copy_model(tmp: Path, env: dict) -> None:
    shutil.copytree(env["model"], tmp / "model")


def ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def predictions(folder: Path) -> dict:
    return {r["id"]: r for r in map(json.loads, (folder / "predictions.jsonl").read_text().splitlines())}


def eval_twice_first(*first_args):
    def prepare(tmp: Path, env: dict) -> None:
        copy_model(tmp, env)
        ok(run_medtune(*fill(first_args, tmp, env)))
    return prepare


def same_answers_as_fresh_run(*args):
    """The re-run's answers equal a fresh run's with the new setting: nothing stale was reused."""
    def check(result, tmp: Path, env: dict) -> None:
        ok(result)
        fresh = run_medtune(*fill(args, tmp, env), "--output_dir", str(tmp / "fresh"))
        ok(fresh)
        assert predictions(tmp / "out") == predictions(tmp / "fresh")
    return check


STALE_EVAL = ("eval", "cmb-exam", "--model_name_or_path", "{tmp}/model", "--data_dir", "{tmp}/cmb", "--limit", "3")


def change_weights_after_first_eval(tmp: Path, env: dict) -> None:
    eval_twice_first(*STALE_EVAL, "--output_dir", "{tmp}/out")(tmp, env)
    shutil.copy(env["reseeded"] / "model.safetensors", tmp / "model" / "model.safetensors")


def interrupted_run_resumed(tmp: Path, env: dict) -> None:
    """An uninterrupted 4-step run in {tmp}/whole, and the same run in {tmp}/out cut back to its step-2
    checkpoint, as a kill right after that save leaves it."""
    steps = ("--max_steps", "4", "--save_steps", "2", "--save_total_limit", "5", "--logging_steps", "1")
    base = fill(PT, tmp, env)
    ok(run_medtune(*base, *steps, "--output_dir", str(tmp / "whole")))
    ok(run_medtune(*base, *steps))
    for item in (tmp / "out").iterdir():
        if item.name not in ("checkpoint-2", "medtune_config.yaml"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def train_loss_matches_uninterrupted(result, tmp: Path, env: dict) -> None:
    ok(result)
    resumed = json.loads((tmp / "out" / "train_results.json").read_text())["train_loss"]
    whole = json.loads((tmp / "whole" / "train_results.json").read_text())["train_loss"]
    assert resumed == pytest.approx(whole, abs=1e-6)


def cut_checkpoint_state(tmp: Path, env: dict) -> None:
    shutil.copytree(env["finished"] / "checkpoint-2", tmp / "ckpt")
    state = tmp / "ckpt" / "trainer_state.json"
    state.write_bytes(state.read_bytes()[:40])


def bin_only_model(tmp: Path, env: dict) -> None:
    import torch
    from safetensors.torch import load_file

    copy_model(tmp, env)
    weights = tmp / "model" / "model.safetensors"
    torch.save(load_file(str(weights)), tmp / "model" / "pytorch_model.bin")
    weights.unlink()


def says_which_weights(result, tmp: Path, env: dict) -> None:
    ok(result)
    assert [line for line in result.stderr.splitlines() if "pytorch_model.bin" in line]


def predictions_cut_in_a_character(tmp: Path, env: dict) -> None:
    ok(run_medtune(*fill(EXAM, tmp, env), "--limit", "2"))
    with open(tmp / "out" / "predictions.jsonl", "ab") as handle:
        handle.write('{"id": "t-2", "model_answer": "C", "reply": "答'.encode()[:-1])


def one_line_error(result) -> str:
    """The first `medtune: error:` line of a refused run (one line per problem; one problem, one line)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("medtune: error: ")]
    assert errors, result.stderr[-3000:]
    return errors[0]


def refused_or_answered_afresh(path: str, ids: list[str]):
    """A cut file of an earlier run: refused naming it, or set aside and every answer predicted again."""
    def check(result, tmp: Path, env: dict) -> None:
        if result.returncode == 2:
            assert path.format(tmp=tmp) in one_line_error(result)
            return
        ok(result)
        assert [a["id"] for a in json.loads((tmp / "out" / "answers.json").read_text())] == ids
    return check


def recovers_all_answers(result, tmp: Path, env: dict) -> None:
    ok(result)
    assert [a["id"] for a in json.loads((tmp / "out" / "answers.json").read_text())] == ["t-0", "t-1", "t-2"]


def bom_scored_like_plain(result, tmp: Path, env: dict) -> None:
    ok(result)
    plain = tmp / "plain.json"
    plain.write_bytes(array(PREDICTIONS).encode())
    again = run_medtune("eval", "cmb-score", "--predictions", str(plain), "--truth", str(tmp / "truth.json"),
                        "--output_dir", str(tmp / "plain-out"))
    ok(again)
    scored = [json.loads((folder / "results.json").read_text())["overall"] for folder in (tmp / "out",
                                                                                            tmp / "plain-out")]
    assert scored[0] == scored[1] == 0.5


def copy_finished_pipeline(tmp: Path, env: dict) -> None:
    shutil.copytree(env["pipeline"], tmp / "out")


def killed_during_merge(tmp: Path, env: dict) -> None:
    copy_finished_pipeline(tmp, env)
    state_file = tmp / "out" / "pipeline_state.json"
    state = json.loads(state_file.read_text())
    state["merge-pt"]["finished"] = False
    state_file.write_text(json.dumps(state))
    (tmp / "out" / "merged-pt" / "merge_check.json").unlink()
    (tmp / "out" / "merged-pt" / "model.safetensors").write_bytes(b"cut short")


def merged_again(result, tmp: Path, env: dict) -> None:
    ok(result)
    assert "merge-pt: " in result.stderr and "running it again" in result.stderr
    assert json.loads((tmp / "out" / "merged-pt" / "merge_check.json").read_text())["max_abs_logit_difference"] <= 1e-4


def pt_ran_again_for_learning_rate(result, tmp: Path, env: dict) -> None:
    ok(result)
    assert "pt: running again from scratch (learning_rate 0.002 -> 0.0001)" in result.stderr


def duplicates_counted(result, tmp: Path, env: dict) -> None:
    ok(result)
    path = tmp / "data" / "dup.jsonl"
    assert (f"warning: 2 duplicated records (each equal to an earlier one): {path}:3 = {path}:1, "
            f"{path}:4 = {path}:2") in result.stdout
    assert "4 valid records, 2 duplicated, 0 problems" in result.stdout


# -- the table -------------------------------------------------------------------------------------------------

CASES = [
    # A .json array followed by more data, or with a missing comma: all of it is read or none (issue 15, row 1).
    Case("json-two-arrays/data-check", CHECK, data("a.json", TWO_ARRAYS),
         (f"{{tmp}}/data/a.json:{TWO_ARRAYS_LINE}: invalid JSON: Extra data",), watch=None),
    Case("json-then-jsonl/data-check", CHECK, data("a.json", THEN_JSONL),
         (f"{{tmp}}/data/a.json:{THEN_JSONL_LINE}: invalid JSON: Extra data",), watch=None),
    Case("json-then-garbage/data-check", CHECK, data("a.json", THEN_GARBAGE),
         (f"{{tmp}}/data/a.json:{THEN_GARBAGE_LINE}: invalid JSON: Extra data",), watch=None),
    Case("json-missing-comma/data-check", CHECK, data("a.json", NO_COMMA),
         (f"{{tmp}}/data/a.json:{NO_COMMA_LINE}: invalid JSON: Expecting ',' delimiter",), watch=None),
    Case("json-two-arrays/pt", PT, data("a.json", TWO_ARRAYS),
         (f"{{tmp}}/data/a.json:{TWO_ARRAYS_LINE}: invalid JSON: Extra data",)),
    Case("json-missing-comma/pt", PT, data("a.json", NO_COMMA),
         (f"{{tmp}}/data/a.json:{NO_COMMA_LINE}: invalid JSON: Expecting ',' delimiter",)),
    Case("json-then-jsonl/sft", SFT, data("c.json", CHATS_THEN_JSONL),
         (f"{{tmp}}/data/c.json:{CHATS_THEN_JSONL_LINE}: invalid JSON: Extra data",)),
    Case("json-missing-comma/dpo", DPO, data("p.json", PAIRS_NO_COMMA),
         (f"{{tmp}}/data/p.json:{PAIRS_NO_COMMA_LINE}: invalid JSON: Expecting ',' delimiter",)),
    Case("json-then-garbage/eval-cmb-exam", EXAM, cmb(ITEMS_THEN_GARBAGE, array(KEYS).encode()),
         (f"{{tmp}}/cmb/test.json:{ITEMS_THEN_GARBAGE_LINE}: invalid JSON: Extra data",)),
    Case("json-two-arrays/eval-cmb-score-truth", SCORE, score_files(array(PREDICTIONS).encode(), KEYS_TWO_ARRAYS),
         (f"{{tmp}}/truth.json:{KEYS_TWO_ARRAYS_LINE}: invalid JSON: Extra data",)),
    Case("json-two-arrays/pipeline", PIPELINE, data("a.json", TWO_ARRAYS),
         (f"{{tmp}}/data/a.json:{TWO_ARRAYS_LINE}: invalid JSON: Extra data",)),

    # An adapter from another family with the same hidden size; another size; --output_dir a file (merge).
    Case("adapter-of-another-family/merge", ("merge", "--lora_model", "{adapter}", "--base_model", "{qwen}",
                                             "--output_dir", "{tmp}/out"), expect=("{adapter}",)),
    Case("base-of-another-size/merge", ("merge", "--lora_model", "{adapter}", "--base_model", "{bigger}",
                                        "--output_dir", "{tmp}/out"), expect=("{adapter}",)),
    Case("output-dir-is-a-file/merge", ("merge", "--lora_model", "{adapter}", "--output_dir", "{tmp}/out"),
         {"out": b"a file, not a folder"}, expect=("{tmp}/out",)),
    Case("disk-full/merge", ("merge", "--lora_model", "{adapter}", "--output_dir", "{tmp}/out"),
         expect=("space left on device",), fault="enospc"),

    # Answer files and item files of cmb-exam.
    Case("answers-cover-5-of-20-plus-unknown-id/eval-cmb-exam", EXAM,
         cmb(array(TEST_ITEMS).encode(), array(KEYS[:5] + [dict(KEYS[0], id="no-such-id")]).encode()),
         expect=("{tmp}/cmb/test_answers.json",)),
    Case("duplicated-item-ids/eval-cmb-exam", EXAM,
         cmb(array(TEST_ITEMS + [TEST_ITEMS[3]]).encode(), array(KEYS).encode()),
         expect=("{tmp}/cmb/test.json",)),
    Case("answer-letter-not-an-option/eval-cmb-exam", EXAM,
         cmb(array(TEST_ITEMS).encode(), array(KEYS[:-1] + [dict(KEYS[-1], answer="F")]).encode()),
         expect=("{tmp}/cmb/test_answers.json",)),
    Case("empty-test-json/eval-cmb-exam", EXAM, cmb(b"[]\n", array(KEYS).encode()),
         expect=("{tmp}/cmb/test.json: no records",)),

    # Predictions and truth of cmb-score.
    Case("predictions-with-answer-not-model_answer/eval-cmb-score", SCORE,
         score_files(array([{"id": p["id"], "answer": p["model_answer"]} for p in PREDICTIONS]).encode(),
                     array(KEYS).encode()), expect=("{tmp}/pred.json",)),
    Case("empty-truth/eval-cmb-score", SCORE, score_files(array(PREDICTIONS).encode(), b"[]\n"),
         expect=("{tmp}/truth.json: no records",)),
    Case("duplicated-truth-ids/eval-cmb-score", SCORE,
         score_files(array(PREDICTIONS).encode(), array(KEYS + [KEYS[0]]).encode()),
         expect=("{tmp}/truth.json",)),
    Case("predictions-in-gbk/eval-cmb-score", SCORE,
         score_files(array([dict(p, note="模型答案") for p in PREDICTIONS]).encode("gbk"), array(KEYS).encode()),
         expect=("{tmp}/pred.json",)),
    Case("predictions-with-utf8-bom/eval-cmb-score", SCORE,
         score_files(b"\xef\xbb\xbf" + array(PREDICTIONS).encode(), array(KEYS).encode()),
         check=bom_scored_like_plain),

    # Stale answers: the resume key must hold every option that changes an answer, and the weights.
    Case("max-new-tokens-changed/eval-cmb-exam",
         (*STALE_EVAL, "--mode", "generate", "--max_new_tokens", "3", "--output_dir", "{tmp}/out"),
         cmb(array(TEST_ITEMS).encode()),
         prepare=eval_twice_first(*STALE_EVAL, "--mode", "generate", "--max_new_tokens", "1", "--output_dir",
                                  "{tmp}/out"),
         check=same_answers_as_fresh_run(*STALE_EVAL, "--mode", "generate", "--max_new_tokens", "3")),
    Case("weights-changed-at-same-path/eval-cmb-exam", (*STALE_EVAL, "--output_dir", "{tmp}/out"),
         cmb(array(TEST_ITEMS).encode()), prepare=change_weights_after_first_eval,
         check=same_answers_as_fresh_run(*STALE_EVAL)),

    # Output folders of training stages.
    *[Case(f"full-fine-tune-into-its-model-folder/{stage}",
           (stage, *TRAIN[2:], "--model_name_or_path", "{tmp}/model", "--output_dir", "{tmp}/model",
            "--use_peft", "false"), files, expect=("{tmp}/model",), watch="model", prepare=copy_model)
      for stage, files in (("pt", GOOD_TEXT), ("sft", data("c.jsonl", jsonl(CHATS))),
                           ("dpo", data("p.jsonl", jsonl(PAIRS))))],
    Case("save-strategy-no-into-a-finished-folder/pt", (*PT, "--save_strategy", "no"), GOOD_TEXT,
         expect=("{tmp}/out",), prepare=copy_finished),
    Case("failed-run-keeps-a-finished-folder-config/pt", PT, data("a.txt", b""),  # refused for the data or the folder
         expect=("{tmp}/",), prepare=copy_finished),
    Case("killed-and-resumed-train-loss/pt", (*PT, "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1",
                                              "--resume_from_checkpoint", "true"), GOOD_TEXT,
         prepare=interrupted_run_resumed, check=train_loss_matches_uninterrupted),
    Case("resume-from-a-cut-trainer-state/pt", (*PT, "--resume_from_checkpoint", "{tmp}/ckpt"), GOOD_TEXT,
         expect=("{tmp}/ckpt",), prepare=cut_checkpoint_state),
    Case("disk-full-in-full-fine-tuning/pt", (*PT, "--use_peft", "false"), GOOD_TEXT,  # the partial save removed;
         expect=("space left on device",), fault="enospc",  # the config says how it started
         may_leave=frozenset({"medtune_config.yaml"})),
    Case("model-folder-with-only-pytorch_model.bin/eval-cmb-exam",
         (*STALE_EVAL, "--limit", "2", "--output_dir", "{tmp}/out"), cmb(array(TEST_ITEMS).encode()),
         prepare=bin_only_model, check=says_which_weights),

    # Empty inputs: one line saying so, never a traceback from an empty dataset.
    Case("empty-file/pt", PT, data("a.txt", b""), ("{tmp}/data/a.txt: no records: the file is empty",)),
    Case("whitespace-only-file/pt", PT, data("a.jsonl", b"\n  \n\t\n"), ("{tmp}/data/a.jsonl: no records",)),
    Case("empty-folder/pt", PT, {"data/.keep": b""}, ("{tmp}/data: no .txt/.jsonl/.json files found",)),
    Case("shorter-than-one-block-with-remainder-drop/pt", (*PT, "--remainder", "drop", "--block_size", "512"),
         GOOD_TEXT, ("{tmp}/data/good.jsonl: 6 documents hold", "fewer than one block of 512")),
    Case("empty-file/pipeline", PIPELINE, data("a.txt", b""), ("{tmp}/data/a.txt: no records",)),
    Case("empty-file/sft", SFT, data("c.jsonl", b""), ("{tmp}/data/c.jsonl: no records",)),
    Case("whitespace-only-file/sft", SFT, data("c.json", b" \n\n "), ("{tmp}/data/c.json: no records",)),
    Case("every-conversation-too-long/sft", (*SFT, "--model_max_length", "16"), data("c.jsonl", jsonl(LONG_CHATS)),
         ("{tmp}/data/c.jsonl: all 3 train conversations dropped", "model_max_length (16)")),
    Case("empty-file/dpo", DPO, data("p.jsonl", b""), ("{tmp}/data/p.jsonl: no records",)),
    Case("every-pair-identical/dpo", DPO, data("p.jsonl", jsonl(SAME_PAIRS)), ("{tmp}/data/p.jsonl",)),

    # Cut files left by a kill.
    Case("cut-run-json/eval-cmb-exam", (*EXAM, "--limit", "2"), {**cmb(array(TEST_ITEMS).encode()),
                                                                 "out/run.json": b'{"data": "x", "spl'},
         check=refused_or_answered_afresh("{tmp}/out/run.json", ["t-0", "t-1"])),
    Case("predictions-cut-in-a-utf8-character/eval-cmb-exam", (*EXAM, "--limit", "3"),
         cmb(array(TEST_ITEMS).encode()), prepare=predictions_cut_in_a_character, check=recovers_all_answers),

    # The pipeline: killed during merge, re-run with a changed option.
    Case("killed-during-merge/pipeline", FINISHED_PIPELINE, prepare=killed_during_merge, check=merged_again),
    Case("changed-learning-rate/pipeline", (*FINISHED_PIPELINE, "--pt.learning_rate", "1e-4"),
         prepare=copy_finished_pipeline, check=pt_ran_again_for_learning_rate),

    # YAML configs.
    Case("config-in-gbk/--config", ("pt", "--config", "{tmp}/c.yaml", *TRAIN),
         {"c.yaml": "# 学习率\nlearning_rate: 0.001\n".encode("gbk"), **GOOD_TEXT}, expect=("{tmp}/c.yaml",)),
    Case("config-duplicated-key/--config", ("pt", "--config", "{tmp}/c.yaml", *TRAIN),
         {"c.yaml": b"learning_rate: 0.001\nlora_rank: 4\nlearning_rate: 0.002\n", **GOOD_TEXT},
         expect=("{tmp}/c.yaml:3", "learning_rate")),
    Case("config-value-of-wrong-type/--config", ("pt", "--config", "{tmp}/c.yaml", *TRAIN),
         {"c.yaml": b"lora_rank: 4\nlearning_rate: abc\n", **GOOD_TEXT}, expect=("{tmp}/c.yaml", "learning_rate")),
    Case("config-list-for-a-scalar/--config", ("pt", "--config", "{tmp}/c.yaml", *TRAIN),
         {"c.yaml": b"learning_rate:\n  - 0.001\n  - 0.002\n", **GOOD_TEXT},
         expect=("{tmp}/c.yaml", "learning_rate")),

    # data check: nothing valid is not a pass; duplicates are counted (a warning: exit 0).
    Case("empty-file/data-check", CHECK, data("a.jsonl", b""), ("{tmp}/data/a.jsonl: no records",), watch=None),
    Case("whitespace-only-file/data-check", CHECK, data("a.txt", b"\n \n"), ("{tmp}/data/a.txt: no records",),
         watch=None),
    Case("empty-array/data-check", CHECK, data("a.json", b"[]\n"), ("{tmp}/data/a.json: no records",), watch=None),
    Case("empty-folder/data-check", CHECK, {"data/.keep": b""}, ("{tmp}/data: no ",), watch=None),
    Case("duplicated-records/data-check", CHECK, data("dup.jsonl", jsonl(CHATS[:2] * 2)), watch=None,
         check=duplicates_counted),
]


# -- machinery ------------------------------------------------------------------------------------------------

def fill(args, tmp: Path, env: dict) -> list[str]:
    return [arg.format(tmp=tmp, **env) for arg in args]


def snapshot(folder: Path) -> dict[str, str] | None:
    """Every file under `folder` with the sha256 of its bytes; None when the folder does not exist."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": hashlib.sha256(folder.read_bytes()).hexdigest()}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


FAULTS = {
    # Patched before transformers imports save_file, so every safetensors write fails as on a full disk.
    "enospc": "import errno, safetensors.torch as st\n"
              "def full(*args, **kwargs):\n"
              "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
              "st.save_file = full\n",
}


def run_case(case: Case, args: list[str]) -> subprocess.CompletedProcess:
    if case.fault is None:
        return run_medtune(*args)
    code = FAULTS[case.fault] + "import sys\nfrom medtune.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="session")
def env(tiny_model, tmp_path_factory) -> dict:
    """Models and finished runs shared by every case (built once, read-only for the cases)."""
    from medtune.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("bad-inputs")
    model = tiny_model("glm4")
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "good.jsonl").write_bytes(jsonl(DOCS))
    finished = root / "finished"
    trained = run_medtune("pt", "--model_name_or_path", str(model), "--train_file_dir", str(corpus), "--output_dir",
                          str(finished), "--max_steps", "2", "--save_steps", "2", "--block_size", "32",
                          "--report_to", "none", "--validation_split_percentage", "0")
    assert trained.returncode == 0, trained.stderr[-3000:]
    pipeline = root / "out"  # where FINISHED_PIPELINE writes with {tmp} = root
    piped = run_medtune(*fill(FINISHED_PIPELINE, root, {"model": model, "corpus": corpus}))
    assert piped.returncode == 0, piped.stderr[-3000:]
    return {"model": model, "qwen": tiny_model("qwen2"), "bigger": _bigger_glm4(model, root / "bigger"),
            "reseeded": build_tiny_model("glm4", root / "reseeded", seed=1), "adapter": finished,
            "finished": finished, "pipeline": pipeline, "corpus": corpus}


def _bigger_glm4(model: Path, out: Path) -> Path:
    """The tiny GLM-4 with twice the hidden size: an adapter trained on {model} does not fit it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model)
    config.hidden_size *= 2
    config.intermediate_size *= 2
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (model / name).is_file():
            shutil.copy(model / name, out / name)
    return out


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_bad_input(case: Case, tmp_path: Path, env: dict):
    for name, content in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    if case.prepare:
        case.prepare(tmp_path, env)
    watched = tmp_path / case.watch if case.watch else None
    before = snapshot(watched) if watched else None
    result = run_case(case, fill(case.args, tmp_path, env))
    if case.check:
        case.check(result, tmp_path, env)
        return
    error = one_line_error(result)
    for text in fill(case.expect, tmp_path, env):
        assert text in error
    if watched:
        after = snapshot(watched)
        allowed = set(case.may_leave)
        if before is None and after is not None:
            assert set(after) <= allowed, after
        else:
            assert after == before


def oserror_enospc():
    import errno

    return OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")


def safetensors_enospc():
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("error, named", [(oserror_enospc, "/out/model.safetensors"),
                                          (safetensors_enospc, "writing output")])  # safetensors names no file
def test_a_full_disk_is_one_line_naming_the_file(monkeypatch, capsys, error, named):
    from medtune import cli

    def write_on_a_full_disk(argv):
        raise error()

    monkeypatch.setitem(cli.COMMANDS, "merge", (write_on_a_full_disk, ""))
    monkeypatch.setattr(cli, "setup_logging", lambda: None)
    assert cli.main(["merge"]) == 2
    assert capsys.readouterr().err == (f"medtune: error: {named}: No space left on device; free space "
                                       "(or choose another --output_dir) and run again\n")


def test_only_a_full_disk_becomes_one_line_other_errors_keep_their_traceback(monkeypatch):
    from medtune import cli
    from medtune.errors import MedtuneError, failed_write_reported

    def fail_with(error):
        def command(argv):
            raise error
        monkeypatch.setitem(cli.COMMANDS, "merge", (command, ""))

    monkeypatch.setattr(cli, "setup_logging", lambda: None)
    for bug in (PermissionError(13, "Permission denied", "/out/x"), RuntimeError("a bug")):
        fail_with(bug)
        with pytest.raises(type(bug)):
            cli.main(["merge"])
    explained = MedtuneError("/out/model.safetensors: no space left on device while saving the merged model")
    with pytest.raises(MedtuneError) as failure, failed_write_reported(lambda exc: "never used"):
        raise explained  # already one line that says more: passed on as it is
    assert failure.value is explained
    with pytest.raises(MedtuneError, match="^/out/x: Permission denied$"), failed_write_reported(
            lambda exc: f"{exc.filename}: {exc.strerror}", any_os_error=True):
        raise PermissionError(13, "Permission denied", "/out/x")

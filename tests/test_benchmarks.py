"""The benchmark scripts keep working (a smoke run each; speeds are reported, never asserted)."""

import json
import subprocess
import sys

import pytest

from .conftest import REPO


def run_script(*args: str) -> list[dict]:
    result = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.strip().splitlines()]


def test_train_throughput_prints_json_lines(tmp_path):
    (pt,) = run_script("benchmarks/train_throughput.py", "--stage", "pt", "--steps", "2", "--loss_only_labels", "true")
    assert pt["tokens_per_s"] > 0 and pt["real_token_fraction"] > 0.9
    conversations = (REPO / "data" / "finetune" / "medical_sharegpt_part1.jsonl").read_text(encoding="utf-8")
    (tmp_path / "few.jsonl").write_text("".join(conversations.splitlines(keepends=True)[:24]), encoding="utf-8")
    rows = run_script("benchmarks/train_throughput.py", "--stage", "sft", "--epochs", "1", "--data", str(tmp_path),
                      "--sft_modes", "packed_4d_mask,padded")
    assert [(r.get("mode"), r.get("loss_only_labels")) for r in rows] == [
        ("packed_4d_mask", False), ("packed_4d_mask", True), ("packed_4d_mask", None), ("padded", False),
        ("padded", True), ("padded", None), (None, None)]
    runs = [rows[0], rows[1], rows[3], rows[4]]
    # every mode trains the same conversations: the same real tokens, in 4x fewer steps when packed
    assert len({r["real_tokens"] for r in runs}) == 1 and runs[0]["real_tokens"] > 0
    assert rows[0]["steps"] < rows[3]["steps"]
    assert rows[2]["speedup_vs_todays_path"] == round(rows[1]["real_tokens_per_s"] / rows[0]["real_tokens_per_s"], 3)
    # the best modes: today's among all three paths run, medtune's among its own modes (not the 4-D mask baseline)
    todays = max(rows[0], rows[3], key=lambda r: r["real_tokens_per_s"])
    assert rows[-1]["best_todays_mode"] == {"mode": todays["mode"], "real_tokens_per_s": todays["real_tokens_per_s"]}
    assert rows[-1]["best_medtune_mode"] == {"mode": "padded", "real_tokens_per_s": rows[4]["real_tokens_per_s"]}
    assert rows[-1]["speedup_vs_best_todays_mode"] == round(
        rows[4]["real_tokens_per_s"] / todays["real_tokens_per_s"], 3)


@pytest.mark.slow
def test_dpo_throughput_compares_trls_path_and_sft_in_one_run():
    rows = run_script("benchmarks/train_throughput.py", "--stage", "dpo", "--steps", "1", "--pairs", "8",
                      "--max_length", "256")
    assert [(r["stage"], r.get("path")) for r in rows] == [("sft", None), ("dpo", "trl_stock"), ("dpo", "medtune"),
                                                          ("dpo", None)]
    assert rows[-1]["dpo_speedup_vs_trl_stock"] > 0 and rows[-1]["dpo_rss_vs_sft"] > 0


def test_eval_throughput_prints_json_lines():
    rows = run_script("benchmarks/eval_throughput.py", "--items", "20", "--generate_items", "2", "--max_new_tokens",
                      "4", "--repeats", "1")
    assert [(r["mode"], r.get("question_type")) for r in rows[:2]] == [("likelihood", "单项选择题"),
                                                                      ("likelihood", "多项选择题")]
    assert rows[0]["items"] + rows[1]["items"] == 20 and rows[0]["items_per_s"] > 0
    assert [r.get("length") for r in rows[2:4]] == ["natural_stop", "full_budget"]
    assert "likelihood_speedup_vs_full_budget" in rows[-1]

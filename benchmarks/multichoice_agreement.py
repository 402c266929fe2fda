"""How often likelihood mode's multiple-choice answer equals generate mode's, on a model trained with `medtune sft`.

    python benchmarks/multichoice_agreement.py [--max_steps 120] [--output_dir outputs/multichoice-agreement]

1. `medtune sft --config configs/sft_tiny.yaml --use_peft false` (every weight of the embedded tiny GLM-4) on the
   bundled CMB val items (data/eval/cmb/val.json) as answer-only exchanges -- the official prompt, the answer
   letters as the reply -- so the model learns the answer format;
2. `medtune eval cmb-exam` on the bundled test items in likelihood mode and in generate mode (greedy);
3. one JSON line: on the 多项选择题 items, how often the two answers are the same letter set, each mode's accuracy,
   and how many generate replies gave a set of two or more option letters.
A tiny model learns the format and little medicine, so the figure shows the rule is consistent with what the
model writes, not how a 9B model behaves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CMB = REPO / "data" / "eval" / "cmb"


def medtune(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "medtune", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"medtune {args[0]} failed:\n{done.stderr[-3000:]}")


def answer_only_conversations(path: Path) -> list[dict]:
    """The CMB val items as ShareGPT exchanges: the official answer-only prompt, the letters as the reply."""
    from medtune.data.loading import load_records
    from medtune.eval.cmb import item_prompt

    return [{"conversations": [{"from": "human", "value": item_prompt(item)}, {"from": "gpt", "value": item.answer}]}
            for item in load_records(path, "exam")[0]]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_steps", type=int, default=150)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--max_new_tokens", type=int, default=16, help="Generate mode's budget (answers are short).")
    parser.add_argument("--output_dir", default="outputs/multichoice-agreement")
    args = parser.parse_args()
    out = Path(args.output_dir).resolve()
    if out.exists():
        shutil.rmtree(out)
    train = out / "train"
    train.mkdir(parents=True)
    with open(train / "cmb_val_answer_only.jsonl", "w", encoding="utf-8") as handle:
        for record in answer_only_conversations(CMB / "val.json"):
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    # A random 4M-parameter model learns the answer format only when every weight trains (LoRA stays at chance).
    medtune("sft", "--config", "configs/sft_tiny.yaml", "--train_file_dir", str(train), "--output_dir",
            str(out / "sft"), "--use_peft", "false", "--learning_rate", str(args.learning_rate), "--max_steps",
            str(args.max_steps), "--save_steps", str(args.max_steps), "--validation_split_percentage", "0")
    answers = {}
    for mode in ("likelihood", "generate"):
        medtune("eval", "cmb-exam", "--model_name_or_path", str(out / "sft"), "--data_dir", str(CMB), "--mode",
                mode, "--max_new_tokens", str(args.max_new_tokens), "--output_dir", str(out / mode))
        rows = json.loads((out / mode / "answers.json").read_text(encoding="utf-8"))
        answers[mode] = {r["id"]: "".join(sorted(r["model_answer"])) for r in rows}
    truth = {r["id"]: "".join(sorted(r["answer"])) for r in json.loads((CMB / "test_answers.json").read_text())}
    items = json.loads((CMB / "test.json").read_text(encoding="utf-8"))
    multiple = [i["id"] for i in items if i["question_type"] == "多项选择题"]
    generated_sets = [k for k in multiple if len(answers["generate"][k]) >= 2]
    print(json.dumps({
        "model": f"embedded tiny GLM-4, full medtune sft, {args.max_steps} steps at lr {args.learning_rate}",
        "multiple_choice_items": len(multiple),
        "same_answer": sum(answers["likelihood"][k] == answers["generate"][k] for k in multiple),
        "generate_gave_a_set_of_2_or_more": len(generated_sets),
        "same_answer_where_generate_gave_a_set": sum(answers["likelihood"][k] == answers["generate"][k]
                                                     for k in generated_sets),
        "likelihood_accuracy": round(sum(answers["likelihood"][k] == truth[k] for k in multiple) / len(multiple), 3),
        "generate_accuracy": round(sum(answers["generate"][k] == truth[k] for k in multiple) / len(multiple), 3),
    }, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

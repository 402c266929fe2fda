"""CMB-Clin: each case is a multi-turn consultation -- the description with the first question, then each later
question, the model's own earlier answers kept in the history -- scored against the reference solutions.

Automatic scores are character-level (Chinese has no spaces; characters avoid a segmenter's vocabulary choices):
ROUGE-L F1 over the longest common character subsequence, and BLEU-4 over character n-grams with a brevity
penalty (zero n-gram matches are smoothed with epsilon 0.1 so short answers do not all score 0). An optional judge,
any OpenAI-compatible endpoint, rates each answer 1-5 on the official four criteria.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path

from medtune.data.loading import load_records
from medtune.eval.runner import append_predictions, make_backend, open_run, progress
from medtune.paths import bundled_data_dir

logger = logging.getLogger(__name__)

CRITERIA = {"fluency": "流畅性", "relevance": "相关性", "completeness": "完整性", "proficiency": "医学知识专业性"}
JUDGE_PROMPT = """你是一名资深临床医生，请评价AI助手对病例问题的回答。
病例：{description}
问题：{question}
参考答案：{solution}
AI助手的回答：{answer}

请从以下四个方面各给出1到5的整数分（5为最好）：流畅性、相关性、完整性、医学知识专业性。
只输出JSON，例如：{{"流畅性": 4, "相关性": 5, "完整性": 3, "医学知识专业性": 4}}"""


def characters(text: str) -> list[str]:
    return [c for c in text if not c.isspace()]


def rouge_l(candidate: str, reference: str) -> float:
    a, b = characters(candidate), characters(reference)
    if not a or not b:
        return 0.0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def bleu(candidate: str, reference: str, max_n: int = 4, epsilon: float = 0.1) -> float:
    a, b = characters(candidate), characters(reference)
    if not a or not b:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        grams = Counter(tuple(a[i:i + n]) for i in range(len(a) - n + 1))
        ref_grams = Counter(tuple(b[i:i + n]) for i in range(len(b) - n + 1))
        total = max(sum(grams.values()), 1)
        matched = sum(min(count, ref_grams[g]) for g, count in grams.items())
        log_precision += math.log((matched or epsilon) / total) / max_n
    brevity = 1.0 if len(a) > len(b) else math.exp(1 - len(b) / len(a))
    return brevity * math.exp(log_precision)


def parse_judgement(reply: str) -> dict[str, int | None]:
    """Scores for the four criteria from a judge's reply: JSON if it is JSON, else 'name: score' text."""
    found: dict[str, int | None] = {key: None for key in CRITERIA}
    match = re.search(r"\{.*?\}", reply, re.S)
    if match:
        try:
            data = json.loads(match.group(0))
            for key, name in CRITERIA.items():
                for label in (name, key, name.replace("医学知识", "")):
                    if isinstance(data.get(label), (int, float)):
                        found[key] = int(data[label])
        except json.JSONDecodeError:
            pass
    for key, name in CRITERIA.items():
        if found[key] is None:
            labels = "|".join(re.escape(x) for x in (name, name.replace("医学知识", ""), key))
            hit = re.search(rf"(?:{labels})\s*(?:得分|评分|分数)?\s*[:：为是]?\s*([1-5])(?:\s*分|\s*/\s*5)?", reply, re.I)
            if hit:
                found[key] = int(hit.group(1))
    return {k: (v if v is not None and 1 <= v <= 5 else None) for k, v in found.items()}


def consult(cases, backend, max_new_tokens: int) -> list[list[str]]:
    """Answers to every case's questions in order, batching the k-th turn of all cases together."""
    histories: list[list[dict]] = [[] for _ in cases]
    answers: list[list[str]] = [[] for _ in cases]
    for turn in range(max(len(c.qa_pairs) for c in cases)):
        active = [i for i, c in enumerate(cases) if turn < len(c.qa_pairs)]
        for i in active:
            question = cases[i].qa_pairs[turn]["question"]
            content = f"{cases[i].description}\n{question}" if turn == 0 else question
            histories[i].append({"role": "user", "content": content})
        replies = backend.generate([histories[i] for i in active], max_new_tokens)
        for i, reply in zip(active, replies):
            histories[i].append({"role": "assistant", "content": reply})
            answers[i].append(reply)
    return answers


def run_clin(model_args, eval_args) -> dict:
    location = Path(eval_args.data_dir) if eval_args.data_dir else bundled_data_dir("eval/cmb")
    cases, _ = load_records(location / "clin.json" if location.is_dir() else location, "clin")
    if eval_args.limit is not None:
        cases = cases[: eval_args.limit]
    output_dir = Path(eval_args.output_dir)
    settings = {"data": str(location), "model": model_args.model_name_or_path, "endpoint": eval_args.endpoint,
                "adapter": eval_args.adapter_name_or_path, "judge": eval_args.judge_endpoint,
                "max_new_tokens": eval_args.max_new_tokens}
    done = open_run(output_dir, settings)
    todo = [c for c in cases if c.id not in done]
    judge = None
    if eval_args.judge_endpoint:
        from medtune.eval.backends import EndpointBackend

        judge = EndpointBackend(eval_args.judge_endpoint, eval_args.judge_model)
    if todo:
        backend = make_backend(model_args, eval_args)
        bar = progress(len(cases), len(cases) - len(todo), "cmb-clin")
        for start in range(0, len(todo), eval_args.batch_size):
            batch = todo[start:start + eval_args.batch_size]
            records = []
            for case, answers in zip(batch, consult(batch, backend, eval_args.max_new_tokens)):
                turns = []
                for qa, answer in zip(case.qa_pairs, answers):
                    turn = {"question": qa["question"], "answer": answer, "rouge_l": rouge_l(answer, qa["solution"]),
                            "bleu": bleu(answer, qa["solution"])}
                    if judge is not None:
                        prompt = JUDGE_PROMPT.format(description=case.description, question=qa["question"],
                                                     solution=qa["solution"], answer=answer)
                        reply = judge.generate([[{"role": "user", "content": prompt}]], 256)[0]
                        turn["judge"] = parse_judgement(reply)
                    turns.append(turn)
                records.append({"id": case.id, "title": case.title, "turns": turns})
            append_predictions(output_dir, records)
            done.update({r["id"]: r for r in records})
            bar.update(len(batch))
        bar.close()
    turns = [t for c in cases for t in done[c.id]["turns"]]
    results = {
        "cases": len(cases), "answers": len(turns),
        "rouge_l": sum(t["rouge_l"] for t in turns) / len(turns),
        "bleu": sum(t["bleu"] for t in turns) / len(turns),
        "metric_unit": "character",
    }
    if judge is not None:
        for key in CRITERIA:
            values = [t["judge"][key] for t in turns if t.get("judge", {}).get(key) is not None]
            results[f"judge_{key}"] = sum(values) / len(values) if values else None
            results[f"judge_{key}_unparsed"] = len(turns) - len(values)
    (output_dir / "clin_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    lines = ["# CMB-Clin", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()]
    (output_dir / "clin_results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("CMB-Clin: ROUGE-L %.4f, BLEU %.4f over %d answers -> %s", results["rouge_l"], results["bleu"],
                len(turns), output_dir / "clin_results.json")
    return results

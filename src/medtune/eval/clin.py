"""CMB-Clin: each case is a multi-turn consultation -- the description with the first question, then each later
question, the model's own earlier answers kept in the history -- scored against the reference solutions.

Automatic scores come from maintained libraries, both on the same tokens: sacrebleu's `zh` tokenizer makes every
Chinese character a token (Chinese has no spaces; characters avoid a segmenter's vocabulary choices) and splits
other runs -- drug names, doses -- into words as sacrebleu's 13a does. ROUGE-L F1 is rouge-score's (given these
tokens, since its own tokenizer drops every non-ASCII character), averaged over answers; BLEU-4 is sacrebleu's
corpus BLEU (0-100) with its signature. An optional judge, any OpenAI-compatible endpoint, rates each answer 1-5
on the official four criteria.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from medtune.data.loading import load_records
from medtune.data.readers import raise_if_problems
from medtune.data.resume import progress
from medtune.errors import ConfigError
from medtune.eval.runner import (
    append_predictions,
    content_digest,
    make_backend,
    model_settings,
    open_run,
    repeated_ids,
)
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
TOKENIZATION = ("sacrebleu zh tokenizer for both metrics: each Chinese character is a token, other text is split "
                "into words as sacrebleu 13a does")


def zh_tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    return TokenizerZh()(text).split()


class _ZhTokenizer:
    """rouge-score's tokenizer interface over `zh_tokens`."""

    def tokenize(self, text: str) -> list[str]:
        return zh_tokens(text)


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of one answer against its reference solution."""
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rougeL"], tokenizer=_ZhTokenizer()).score(reference, candidate)["rougeL"].fmeasure


def corpus_bleu(candidates: list[str], references: list[str]) -> tuple[float, str]:
    """(BLEU-4 over all answers, 0-100, as sacrebleu reports it; sacrebleu's signature of the settings)."""
    from sacrebleu.metrics import BLEU

    metric = BLEU(tokenize="zh")
    return metric.corpus_score(candidates, [references]).score, str(metric.get_signature())


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


def load_cases(eval_args):
    """(the case file, the cases to consult); no cases or an id used twice are refused before anything runs."""
    location = Path(eval_args.data_dir) if eval_args.data_dir else bundled_data_dir("eval/cmb")
    clin_file = location / "clin.json" if location.is_dir() else location
    cases, _ = load_records(clin_file, "clin")
    raise_if_problems(repeated_ids(cases, "case"))
    if eval_args.limit is not None:
        cases = cases[: eval_args.limit]
        if not cases:
            raise ConfigError(f"--limit {eval_args.limit} leaves no cases to evaluate")
    return clin_file, cases


def run_clin(model_args, eval_args) -> dict:
    clin_file, cases = load_cases(eval_args)
    output_dir = Path(eval_args.output_dir)
    # Only the answers are resumed; the metrics are recomputed from them and the solutions on every run.
    settings = {"data": str(clin_file), "data_digest": content_digest(clin_file), "judge": eval_args.judge_endpoint,
                "judge_model": eval_args.judge_model if eval_args.judge_endpoint else None,
                **model_settings(model_args, eval_args, generates=True)}
    done = open_run(output_dir, settings)
    todo = [c for c in cases if c.id not in done]
    judge = None
    if eval_args.judge_endpoint:
        from medtune.eval.backends import EndpointBackend

        judge = EndpointBackend(eval_args.judge_endpoint, eval_args.judge_model, api_key=eval_args.judge_api_key,
                                max_retries=eval_args.endpoint_max_retries, key_option="--judge_api_key")
    if todo:
        backend = make_backend(model_args, eval_args)
        bar = progress(len(cases), len(cases) - len(todo), "cmb-clin")
        for start in range(0, len(todo), eval_args.batch_size):
            batch = todo[start:start + eval_args.batch_size]
            records = []
            for case, answers in zip(batch, consult(batch, backend, eval_args.max_new_tokens)):
                turns = []
                for qa, answer in zip(case.qa_pairs, answers):
                    turn = {"question": qa["question"], "answer": answer}
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
    answers = [t["answer"] for t in turns]
    solutions = [qa["solution"] for c in cases for qa in c.qa_pairs]
    bleu, signature = corpus_bleu(answers, solutions)
    results = {
        "cases": len(cases), "answers": len(turns),
        "rouge_l": sum(rouge_l(a, s) for a, s in zip(answers, solutions)) / len(turns),
        "bleu": bleu, "bleu_signature": signature, "tokenization": TOKENIZATION,
    }
    if judge is not None:
        for key in CRITERIA:
            values = [t["judge"][key] for t in turns if t.get("judge", {}).get(key) is not None]
            results[f"judge_{key}"] = sum(values) / len(values) if values else None
            results[f"judge_{key}_unparsed"] = len(turns) - len(values)
    (output_dir / "clin_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    lines = ["# CMB-Clin", "", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {str(v).replace('|', '&#124;')} |"
              for k, v in results.items()]  # the BLEU signature's bars would split the table's cells
    (output_dir / "clin_results.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.info("CMB-Clin: ROUGE-L F1 %.4f, BLEU %.2f over %d answers -> %s", results["rouge_l"], results["bleu"],
                len(turns), output_dir / "clin_results.json")
    return results

"""`medtune eval ...`: run an evaluation resumably and write its answer file and results.

Answers are appended to `predictions.jsonl` as they are produced; a re-run skips ids already there, so a crash
loses nothing and the finished results equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from medtune.data.loading import load_records
from medtune.data.records import AnswerKey, ExamItem
from medtune.errors import ConfigError, DataError, Problem
from medtune.eval.cmb import extract_answer, item_messages, pick_shots, score, shown_options
from medtune.eval.report import write_results
from medtune.paths import bundled_data_dir

logger = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"
RUN_SETTINGS = "run.json"


def make_backend(model_args, eval_args):
    if eval_args.endpoint:
        from medtune.eval.backends import EndpointBackend

        return EndpointBackend(eval_args.endpoint, eval_args.endpoint_model)
    from medtune.eval.backends import LocalBackend

    return LocalBackend(model_args.model_name_or_path, eval_args.adapter_name_or_path, model_args.template,
                        model_args.torch_dtype, model_args.trust_remote_code, eval_args.batch_size)


def resolve_mode(eval_args) -> str:
    if eval_args.mode == "auto":
        return "generate" if eval_args.endpoint else "likelihood"
    if eval_args.mode == "likelihood" and eval_args.endpoint:
        raise ConfigError("--mode likelihood needs a local model (logits); use --mode generate with --endpoint")
    return eval_args.mode


# -- resumable predictions -----------------------------------------------------------------------------------------

def open_run(output_dir: Path, settings: dict) -> dict[str, dict]:
    """Predictions already made by an interrupted run with the same settings (id -> record)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    settings_file = output_dir / RUN_SETTINGS
    if settings_file.is_file():
        previous = json.loads(settings_file.read_text(encoding="utf-8"))
        if previous != settings:
            changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
            raise ConfigError(f"{output_dir} holds an evaluation with other settings ({', '.join(changed)}); "
                              "choose a new --output_dir")
    else:
        settings_file.write_text(json.dumps(settings, indent=2, ensure_ascii=False), encoding="utf-8")
    done: dict[str, dict] = {}
    path = output_dir / PREDICTIONS
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that item is simply predicted again
            done[str(record["id"])] = record
    return done


def append_predictions(output_dir: Path, records: list[dict]) -> None:
    with open(output_dir / PREDICTIONS, "a", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()


def progress(total: int, done: int, description: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=description, unit="item", dynamic_ncols=True)


# -- CMB-Exam and the safety probe ----------------------------------------------------------------------------------

SAFETY_PROBE = "eval/safety/drug_safety_probe.json"


def load_exam(eval_args, default_data: str) -> tuple[list[ExamItem], list[ExamItem], list[AnswerKey] | None]:
    """(items to answer, val items for few-shot examples, answer keys or None when there are none)."""
    location = Path(eval_args.data_dir) if eval_args.data_dir else bundled_data_dir(default_data)
    if location.is_file():
        items, val_items = load_records(location, "exam")[0], []
    else:
        name = "val.json" if eval_args.split == "val" else "test.json"
        if not (location / name).is_file():
            raise DataError([Problem(str(location / name), None, None, "not found (expected CMB-Exam items)")])
        items = load_records(location / name, "exam")[0]
        val_items = load_records(location / "val.json", "exam")[0] if (location / "val.json").is_file() else []
    answers_file = eval_args.answers_file
    if answers_file is None and location.is_dir() and eval_args.split == "test":
        default = location / "test_answers.json"
        answers_file = str(default) if default.is_file() else None
    keys = None
    if answers_file:
        keys = load_records(answers_file, "answers")[0]
        by_id = {i.id: i for i in items}
        for key in keys:  # the answer file may lack exam_type/class; the items have them
            item = by_id.get(key.id)
            if item is not None:
                key.exam_type, key.exam_class = key.exam_type or item.exam_type, key.exam_class or item.exam_class
        keys = [k for k in keys if k.id in by_id]
    elif all(i.answer for i in items):
        keys = [AnswerKey(i.id, i.answer, i.exam_type, i.exam_class) for i in items]
    if eval_args.shots and not val_items:
        raise ConfigError(f"--shots {eval_args.shots} needs val.json beside the test items in {location}")
    if eval_args.limit is not None:
        items = items[: eval_args.limit]
        if keys is not None:
            wanted = {i.id for i in items}
            keys = [k for k in keys if k.id in wanted]
    return items, val_items, keys


def predict_exam(items, val_items, backend, eval_args, mode: str, output_dir: Path, done: dict) -> dict[str, str]:
    from medtune.eval.backends import Choice

    todo = [i for i in items if i.id not in done]
    if mode == "likelihood":
        # Single-choice prompts share forward passes: kept together, every pass gets exactly --batch_size of them.
        # Grouped by exam class, a pass's prompts start alike (the shared start runs once); longest first within a
        # class (as lm-evaluation-harness orders them), they need little padding.
        todo.sort(key=lambda i: (i.multiple, i.exam_type, i.exam_class,
                                 -len(i.question) - sum(map(len, i.options.values()))))
    bar = progress(len(items), len(items) - len(todo), "cmb-exam")
    chunk = max(1, eval_args.batch_size)
    for start in range(0, len(todo), chunk):
        batch = todo[start:start + chunk]
        conversations = [item_messages(i, pick_shots(val_items, i, eval_args.shots), eval_args.cot, eval_args.official)
                         for i in batch]
        if mode == "likelihood":
            letters = ["".join(shown_options(i, eval_args.official)) for i in batch]
            chosen = backend.choose([Choice(m, ls, i.multiple) for m, ls, i in zip(conversations, letters, batch)])
            records = [{"id": i.id, "model_answer": answer, "scores": {k: round(v, 6) for k, v in s.items()}}
                       for i, (answer, s) in zip(batch, chosen)]
        else:
            replies = backend.generate(conversations, eval_args.max_new_tokens)
            records = [{"id": i.id, "model_answer": extract_answer(r, "".join(i.options), eval_args.official),
                        "reply": r} for i, r in zip(batch, replies)]
        append_predictions(output_dir, records)
        done.update({r["id"]: r for r in records})
        bar.update(len(batch))
    bar.close()
    return {i.id: done[i.id]["model_answer"] for i in items}


def run_exam(model_args, eval_args, default_data: str = "eval/cmb", title: str = "CMB-Exam") -> dict | None:
    """CMB-Exam items (or the safety probe, which has the same schema) -> answers.json and results."""
    items, val_items, keys = load_exam(eval_args, default_data)
    mode = resolve_mode(eval_args)
    output_dir = Path(eval_args.output_dir)
    settings = {"data": str(eval_args.data_dir or bundled_data_dir(default_data)), "split": eval_args.split,
                "model": model_args.model_name_or_path, "adapter": eval_args.adapter_name_or_path,
                "endpoint": eval_args.endpoint, "mode": mode, "cot": eval_args.cot, "shots": eval_args.shots,
                "official": eval_args.official, "template": model_args.template}
    done = open_run(output_dir, settings)
    backend = make_backend(model_args, eval_args) if any(i.id not in done for i in items) else None
    started = time.perf_counter()
    predictions = predict_exam(items, val_items, backend, eval_args, mode, output_dir, done) if backend else {
        i.id: done[i.id]["model_answer"] for i in items}
    elapsed = time.perf_counter() - started
    answers = [{"id": i.id, "model_answer": predictions[i.id]} for i in items]
    (output_dir / "answers.json").write_text(json.dumps(answers, indent=1, ensure_ascii=False), encoding="utf-8")
    logger.info("%d answers written to %s (%.1f items/s this run)", len(answers), output_dir / "answers.json",
                len(items) / elapsed if elapsed > 0 else float("inf"))
    if keys is None:
        logger.info("no answer key for these items: scoring skipped (use medtune eval cmb-score later)")
        return None
    results = score(predictions, keys).to_dict() | {
        "model": getattr(backend, "name", settings["model"] or "embedded tiny model"), "items": len(items),
        **{k: settings[k] for k in ("mode", "cot", "shots", "official", "split")}}
    write_results(output_dir, results, title)
    logger.info("%s: overall %.2f%% (items right %.2f%%) -> %s", title, 100 * results["overall"],
                100 * results["item_accuracy"], output_dir / "results.md")
    return results


def run_score(eval_args) -> dict:
    """Score any tool's answer file ([{id, model_answer}]) against an answer key."""
    if not eval_args.predictions or not eval_args.truth:
        raise ConfigError("cmb-score needs --predictions ANSWERS.json and --truth TRUTH.json")
    path = Path(eval_args.predictions)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError([Problem(str(path), getattr(exc, "lineno", None), None, f"cannot read answers ({exc})")]) from None
    if not isinstance(raw, list) or not all(isinstance(r, dict) and "id" in r for r in raw):
        raise DataError([Problem(str(path), None, None, 'expected a JSON array of {"id", "model_answer"}')])
    predictions = {str(r["id"]): str(r.get("model_answer") or "") for r in raw}
    keys = load_records(eval_args.truth, "answers")[0]
    missing = [k for k in keys if not (k.exam_type and k.exam_class)]
    if missing:
        raise DataError([Problem(k.source, None, "exam_type", "the truth file needs exam_type and exam_class")
                         for k in missing[:20]])
    results = score(predictions, keys).to_dict() | {"model": str(path), "items": len(keys),
                                                    "unanswered": sum(1 for k in keys if not predictions.get(k.id))}
    write_results(Path(eval_args.output_dir), results, "CMB-Exam (scored)")
    logger.info("overall %.2f%% -> %s", 100 * results["overall"], Path(eval_args.output_dir) / "results.json")
    return results


# -- perplexity --------------------------------------------------------------------------------------------------

def run_perplexity(model_args, eval_args) -> dict:
    """Perplexity on held-out text, over blocks built exactly as `medtune pt` builds them."""
    import torch

    from medtune.data.blocks import IGNORE_INDEX, group_into_blocks, tokenize_texts
    from medtune.eval.backends import LocalBackend

    location = eval_args.data_dir or bundled_data_dir("pretrain")
    documents, _ = load_records(location, "text")
    if eval_args.limit is not None:
        documents = documents[: eval_args.limit]
    backend = LocalBackend(model_args.model_name_or_path, eval_args.adapter_name_or_path, model_args.template,
                           model_args.torch_dtype, model_args.trust_remote_code, eval_args.batch_size)
    tokenizer = backend.tokenizer
    blocks, stats = group_into_blocks(tokenize_texts((d.text for d in documents), tokenizer), eval_args.block_size,
                                      "pad", tokenizer.pad_token_id)
    total_loss, total_tokens = 0.0, 0
    bar = progress(len(blocks), 0, "perplexity")
    for start in range(0, len(blocks), eval_args.batch_size):
        batch = blocks[start:start + eval_args.batch_size]
        input_ids = torch.tensor([b["input_ids"] for b in batch], device=backend.device)
        attention = torch.tensor([b["attention_mask"] for b in batch], device=backend.device)
        labels = torch.tensor([b["labels"] for b in batch], device=backend.device)
        with torch.no_grad():
            logits = backend.model(input_ids=input_ids, attention_mask=attention).logits.float()
        shift_labels = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), shift_labels,
                                                   ignore_index=IGNORE_INDEX, reduction="sum")
        total_loss += losses.item()
        total_tokens += int((shift_labels != IGNORE_INDEX).sum())
        bar.update(len(batch))
    bar.close()
    loss = total_loss / max(total_tokens, 1)
    results = {"model": backend.name, "data": str(location), "documents": stats.documents, "tokens": stats.tokens,
               "predicted_tokens": total_tokens, "loss": loss, "perplexity": math.exp(min(loss, 700)),
               "block_size": eval_args.block_size}
    output_dir = Path(eval_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "perplexity.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    logger.info("perplexity %.3f over %d tokens -> %s", results["perplexity"], total_tokens,
                output_dir / "perplexity.json")
    return results

"""`medtune eval ...`: run an evaluation resumably and write its answer file and results.

Answers are appended to `predictions.jsonl` as they are produced; a re-run skips ids already there, so a crash
loses nothing and the finished results equal an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

from medtune.data.loading import load_records
from medtune.data.readers import raise_if_problems
from medtune.data.records import AnswerKey, ExamItem
from medtune.data.resume import (
    append_lines,
    changed_settings,
    folder_fingerprint,
    progress,
    read_predictions,
    read_settings,
    write_atomically,
)
from medtune.errors import ConfigError, DataError, Problem
from medtune.eval.cmb import (
    answer_records,
    check_answer_keys,
    item_messages,
    pick_shots,
    read_model_answers,
    score,
    short_of_shots,
    shown_options,
)
from medtune.eval.report import write_results
from medtune.paths import bundled_data_dir

logger = logging.getLogger(__name__)
PREDICTIONS = "predictions.jsonl"
RUN_SETTINGS = "run.json"


def make_backend(model_args, eval_args):
    if eval_args.endpoint:
        from medtune.eval.backends import EndpointBackend

        return EndpointBackend(eval_args.endpoint, eval_args.endpoint_model, api_key=eval_args.endpoint_api_key,
                               max_retries=eval_args.endpoint_max_retries, system_prompt=eval_args.system_prompt)
    from medtune.eval.backends import LocalBackend

    return LocalBackend(model_args.model_name_or_path, eval_args.adapter_name_or_path, model_args.template,
                        model_args.torch_dtype, model_args.trust_remote_code, eval_args.batch_size,
                        model_args.tokenizer_name_or_path, model_args.attn_implementation,
                        system_prompt=eval_args.system_prompt)


def resolve_mode(eval_args) -> str:
    if eval_args.mode == "auto":  # sampled replies to vote over only exist in generate mode
        return "generate" if eval_args.endpoint or eval_args.num_samples > 1 else "likelihood"
    if eval_args.mode == "likelihood" and eval_args.endpoint:
        raise ConfigError("--mode likelihood needs a local model (logits); use --mode generate with --endpoint")
    if eval_args.mode == "likelihood" and eval_args.num_samples > 1:
        raise ConfigError("--num_samples votes over sampled replies; it needs --mode generate")
    return eval_args.mode


# -- resumable predictions -----------------------------------------------------------------------------------------

def content_digest(*files: Path) -> str:
    """A hash of data files' bytes (evaluation data is small; unlike weights it is often copied, keeping content)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# Generation options that change a reply; the sampling ones may not exist on EvalArguments yet.
GENERATION_OPTIONS = ("max_new_tokens", "num_samples", "temperature", "top_p", "top_k", "seed")


def model_settings(model_args, eval_args, generates: bool) -> dict:
    """The part of an evaluation's resume key that says which model answers and how it decodes."""
    settings = {"endpoint": eval_args.endpoint}
    if eval_args.endpoint:
        settings["endpoint_model"] = eval_args.endpoint_model
    else:
        import torch

        from medtune.models.loader import resolve_model_path

        model = resolve_model_path(model_args.model_name_or_path)
        settings |= {"model": model_args.model_name_or_path, "adapter": eval_args.adapter_name_or_path,
                     "template": model_args.template, "torch_dtype": model_args.torch_dtype,
                     # "auto" means bf16 on a GPU and fp32 on the CPU; the device also moves the arithmetic
                     "device": "cuda" if torch.cuda.is_available() else "cpu",
                     "tokenizer": getattr(model_args, "tokenizer_name_or_path", None),
                     "model_weights": folder_fingerprint(model),
                     "adapter_weights": folder_fingerprint(eval_args.adapter_name_or_path)}
    if generates:
        settings |= {name: getattr(eval_args, name) for name in GENERATION_OPTIONS if hasattr(eval_args, name)}
    if eval_args.system_prompt:  # only when set, so the answers of runs from before the option stay reusable
        settings["system_prompt"] = eval_args.system_prompt
    return settings


def open_run(output_dir: Path, settings: dict) -> dict[str, dict]:
    """Predictions already made by an earlier run with the same settings (id -> record).

    Answers made with other settings or other weights are never reused: they are moved aside (with the run.json
    that describes them) as `*.stale-<time>.*`, one log line says why, and the evaluation starts again. A run.json
    that cannot be read is treated the same way, since nothing then says what its predictions were made with.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    settings_file, predictions_file = output_dir / RUN_SETTINGS, output_dir / PREDICTIONS
    if settings_file.is_file() or predictions_file.is_file():
        previous = read_settings(settings_file)
        if previous != settings:
            set_aside_stale_run(output_dir, stale_reason(settings_file, previous, settings))
    if not settings_file.is_file():
        write_atomically(settings_file, json.dumps(settings, indent=2, ensure_ascii=False).encode())
    return read_predictions(predictions_file)


def stale_reason(settings_file: Path, previous: dict | None, settings: dict) -> str:
    if previous is None:
        return f"{settings_file.name} is missing or unreadable"
    return f"changed: {', '.join(changed_settings(previous, settings))}"


def set_aside_stale_run(output_dir: Path, reason: str) -> None:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    while any((output_dir / f"{Path(n).stem}.stale-{stamp}{Path(n).suffix}").exists() for n in (PREDICTIONS, RUN_SETTINGS)):
        stamp += "x"  # two set-asides within one second
    moved = []
    for name in (PREDICTIONS, RUN_SETTINGS):
        if (output_dir / name).exists():
            target = output_dir / f"{Path(name).stem}.stale-{stamp}{Path(name).suffix}"
            os.replace(output_dir / name, target)
            moved.append(target.name)
    logger.warning("%s: earlier answers not reused (%s); moved to %s, predicting again", output_dir, reason,
                   " and ".join(moved))


def append_predictions(output_dir: Path, records: list[dict]) -> None:
    append_lines(output_dir / PREDICTIONS, records)


# -- CMB-Exam and the safety probe ----------------------------------------------------------------------------------

SAFETY_PROBE = "eval/safety/drug_safety_probe.json"


def exam_files(eval_args, default_data: str) -> tuple[Path, Path]:
    """(the data folder or file, the file of items to answer)."""
    location = Path(eval_args.data_dir) if eval_args.data_dir else bundled_data_dir(default_data)
    if location.is_file():
        return location, location
    return location, location / ("val.json" if eval_args.split == "val" else "test.json")


def load_exam(eval_args, default_data: str) -> tuple[list[ExamItem], list[ExamItem], list[AnswerKey] | None]:
    """(items to answer, val items for few-shot examples, answer keys or None when there are none).

    Refused before anything is written: no items, an id used twice, an answer file that misses an evaluated
    item, names an id that is not an item, or gives a letter that is not one of the item's options.
    """
    location, items_file = exam_files(eval_args, default_data)
    if not items_file.is_file():
        raise DataError([Problem(str(items_file), None, None, "not found (expected CMB-Exam items)")])
    val_file = location / "val.json"
    val_items = load_records(val_file, "exam")[0] if location.is_dir() and val_file.is_file() else []
    items = load_records(items_file, "exam")[0]
    raise_if_problems(repeated_ids(items, "item"))
    answers_file = eval_args.answers_file
    if answers_file is None and location.is_dir() and eval_args.split == "test":
        default = location / "test_answers.json"
        answers_file = str(default) if default.is_file() else None
    keys = None
    if answers_file:
        keys = load_records(answers_file, "answers")[0]
        raise_if_problems(answer_key_problems(keys, items, items_file))
        by_id = {i.id: i for i in items}
        for key in keys:  # the answer file may lack exam_type/class; the items have them
            item = by_id[key.id]
            key.exam_type, key.exam_class = key.exam_type or item.exam_type, key.exam_class or item.exam_class
    elif any(i.answer for i in items):
        unanswered = [i for i in items if not i.answer]
        if unanswered:
            raise DataError([source_problem(unanswered[0].source, "answer", (
                f"{len(unanswered)} of {len(items)} items have no answer while the others have one; give every "
                "item its answer, or none and an --answers_file"))])
        keys = [AnswerKey(i.id, i.answer, i.exam_type, i.exam_class) for i in items]
    if eval_args.shots and not val_items:
        raise ConfigError(f"--shots {eval_args.shots} needs val.json beside the test items in {location}")
    if eval_args.limit is not None:
        items = items[: eval_args.limit]
        if not items:
            raise ConfigError(f"--limit {eval_args.limit} leaves no items to evaluate")
    if keys is not None:
        wanted = {i.id for i in items}
        keys = [k for k in keys if k.id in wanted]
        missing = [i.id for i in items if i.id not in {k.id for k in keys}]
        if missing:  # scoring would count them as wrong, or report accuracy over fewer items than it says
            raise DataError([Problem(str(answers_file), None, None, (
                f"no answer for {len(missing)} of the {len(items)} items evaluated from {items_file} (e.g. "
                f"{', '.join(missing[:3])}); the answer file must cover every item"))])
    return items, val_items, keys


def source_problem(source: str, field: str | None, message: str) -> Problem:
    """A problem located at a record's `file:line` source."""
    path, _, line = source.rpartition(":")
    return Problem(path, int(line), field, message) if line.isdigit() else Problem(source, None, field, message)


def one_line(problems: list[Problem], what: str) -> list[Problem]:
    """The first problem of a kind, with how many more there are (an 11,200-line answer file gives one line)."""
    if len(problems) <= 1:
        return problems
    first = problems[0]
    return [Problem(first.path, first.line, first.field, f"{first.message} (and {len(problems) - 1} more {what})")]


def repeated_ids(records: list, what: str) -> list[Problem]:
    first_line: dict[str, str] = {}
    problems = []
    for record in records:
        if record.id in first_line:
            problems.append(source_problem(record.source, "id", f"{record.id!r} repeats the {what} at "
                                                                f"{first_line[record.id]}"))
        first_line.setdefault(record.id, record.source)
    return one_line(problems, "repeated ids")


def answer_key_problems(keys: list[AnswerKey], items: list[ExamItem], items_file: Path) -> list[Problem]:
    by_id = {i.id: i for i in items}
    unknown = [source_problem(k.source, "id", f"{k.id!r} is not an item of {items_file}") for k in keys
               if k.id not in by_id]
    wrong = []
    for key in keys:
        item = by_id.get(key.id)
        if item is None:
            continue
        if not set(key.answer) <= set(item.options):
            wrong.append(source_problem(key.source, "answer", f"{key.answer!r} is not among the options of item "
                                                              f"{key.id!r} ({''.join(item.options)})"))
        elif not item.multiple and len(key.answer) != 1:
            wrong.append(source_problem(key.source, "answer", f"item {key.id!r} is a {item.question_type} (one "
                                                              f"answer), got {key.answer!r}"))
    return repeated_ids(keys, "answer") + one_line(unknown, "unknown ids") + one_line(wrong, "wrong answers")


def predict_exam(items, val_items, backend, eval_args, mode: str, output_dir: Path, done: dict) -> dict[str, str]:
    from medtune.eval.backends import Choice

    todo = [i for i in items if i.id not in done]
    if eval_args.official and eval_args.shots:
        for (exam_type, exam_class), available in short_of_shots(val_items, todo, eval_args.shots).items():
            logger.warning("--official --shots %d: only %d val items of %s/%s; its items get %d examples",
                           eval_args.shots, available, exam_type, exam_class, available)
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
        conversations = [item_messages(i, pick_shots(val_items, i, eval_args.shots, eval_args.official, eval_args.seed),
                                       eval_args.cot, eval_args.official) for i in batch]
        if mode == "likelihood":
            letters = ["".join(shown_options(i, eval_args.official)) for i in batch]
            chosen = backend.choose([Choice(m, ls, i.multiple) for m, ls, i in zip(conversations, letters, batch)])
            records = [{"id": i.id, "model_answer": answer, "scores": {k: round(v, 6) for k, v in s.items()}}
                       for i, (answer, s) in zip(batch, chosen)]
        else:
            replies = backend.generate(conversations, eval_args.max_new_tokens, num_samples=eval_args.num_samples,
                                       temperature=eval_args.temperature, top_p=eval_args.top_p, seed=eval_args.seed)
            records = answer_records(batch, replies, eval_args.num_samples, eval_args.official)
        append_predictions(output_dir, records)
        done.update({r["id"]: r for r in records})
        bar.update(len(batch))
    bar.close()
    return {i.id: done[i.id]["model_answer"] for i in items}


def exam_settings(model_args, eval_args, default_data: str, mode: str) -> dict:
    """Every option that can change an answer (the resume key). Not the answer file or --limit: predictions are
    made per item without looking at the key, and scoring is redone from the current key on every run."""
    location, items_file = exam_files(eval_args, default_data)
    data_files = [items_file]
    if eval_args.shots:
        data_files.append(location / "val.json")  # the few-shot examples are part of the prompt
    return {"data": str(location), "data_digest": content_digest(*data_files), "split": eval_args.split,
            "mode": mode, "cot": eval_args.cot, "shots": eval_args.shots, "official": eval_args.official,
            # official few-shot examples are a seeded random draw, so the seed changes the prompt
            "shot_seed": eval_args.seed if eval_args.official and eval_args.shots else None,
            **model_settings(model_args, eval_args, generates=mode == "generate")}


def run_exam(model_args, eval_args, default_data: str = "eval/cmb", title: str = "CMB-Exam") -> dict | None:
    """CMB-Exam items (or the safety probe, which has the same schema) -> answers.json and results."""
    items, val_items, keys = load_exam(eval_args, default_data)
    mode = resolve_mode(eval_args)
    output_dir = Path(eval_args.output_dir)
    settings = exam_settings(model_args, eval_args, default_data, mode)
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
    model = getattr(backend, "name", settings.get("model") or settings["endpoint"] or "embedded tiny model")
    results = score(predictions, keys, exact=eval_args.official).to_dict() | {
        "model": model, "items": len(items), "chance": chance_accuracy(items, keys, eval_args.official),
        **{k: settings[k] for k in ("mode", "cot", "shots", "official", "split")}}
    write_results(output_dir, results, title)
    logger.info("%s: overall %.2f%% (items right %.2f%%) -> %s", title, 100 * results["overall"],
                100 * results["item_accuracy"], output_dir / "results.md")
    return results


def chance_accuracy(items: list[ExamItem], keys: list[AnswerKey], official: bool) -> float:
    """The expected `overall` of uniform random guessing among the options shown: 1/k for a single-answer item
    with k options, 1/(2^k - 1) for a multiple-answer one (any non-empty set), averaged as `overall` is (classes,
    then exam types), so a chart can draw the chance line next to the scores."""
    by_id = {i.id: i for i in items}
    by_class: dict[tuple[str, str], list[float]] = {}
    for key in keys:
        item = by_id[key.id]
        k = len(shown_options(item, official))
        by_class.setdefault((key.exam_type, key.exam_class), []).append(1 / (2 ** k - 1) if item.multiple else 1 / k)
    by_type: dict[str, list[float]] = {}
    for (exam_type, _), values in by_class.items():
        by_type.setdefault(exam_type, []).append(sum(values) / len(values))
    return sum(sum(v) / len(v) for v in by_type.values()) / len(by_type) if by_type else 0.0


def run_score(eval_args) -> dict:
    """Score any tool's answer file ([{id, model_answer}]) against an answer key.

    `--official` compares exact strings as the official score.py does; the default compares letter sets and
    reports how many answers were counted right only thanks to that normalisation.
    """
    if not eval_args.predictions or not eval_args.truth:
        raise ConfigError("cmb-score needs --predictions ANSWERS.json and --truth TRUTH.json")
    path = Path(eval_args.predictions)
    predictions = read_model_answers(path)
    keys = load_records(eval_args.truth, "answers")[0]
    check_answer_keys(keys, str(eval_args.truth))
    known = {k.id for k in keys}
    unknown = [i for i in predictions if i not in known]
    if unknown:
        logger.warning("%s: %d answers have ids not in the truth file (e.g. %s); they are not scored", path,
                       len(unknown), unknown[0])
    results = score(predictions, keys, exact=eval_args.official).to_dict() | {
        "model": str(path), "items": len(keys), "unanswered": sum(1 for k in keys if not predictions.get(k.id)),
        "unknown_ids": len(unknown), "official": eval_args.official}
    write_results(Path(eval_args.output_dir), results, "CMB-Exam (scored)")
    if eval_args.official:
        logger.info("exact-string comparison (official): %d answers with the right letters spelt differently "
                    "(order, case, separators) were counted wrong", results["right_only_when_normalised"])
    else:
        logger.info("letter-set comparison: %d answers were counted right only thanks to normalisation (order, case, "
                    "separators); --official compares exact strings", results["right_only_when_normalised"])
    logger.info("overall %.2f%% -> %s", 100 * results["overall"], Path(eval_args.output_dir) / "results.json")
    return results


# -- perplexity --------------------------------------------------------------------------------------------------

def perplexity_documents(eval_args) -> tuple[list, str]:
    """The documents to measure and a description of them. Without --data_dir: the bundled corpus's held-out
    documents, split exactly as `medtune pt` splits them by default, so the measure is on text a default pt run
    never trained on (the rest of that corpus is its training set)."""
    if eval_args.data_dir:
        documents, _ = load_records(eval_args.data_dir, "text")
        return documents, str(eval_args.data_dir)
    from medtune.config import PretrainDataArguments
    from medtune.data.pretrain import load_documents

    defaults = PretrainDataArguments()
    _, held_out = load_documents(defaults)
    return held_out, (f"{bundled_data_dir('pretrain')}: the {defaults.validation_split_percentage:g}% of documents "
                      "`medtune pt` holds out by default (validation_split_percentage, fixed seed), not its training "
                      "part")


def run_perplexity(model_args, eval_args) -> dict:
    """Perplexity on held-out text, over blocks built exactly as `medtune pt` builds them."""
    import torch

    from medtune.data.blocks import IGNORE_INDEX, group_into_blocks, tokenize_texts
    from medtune.eval.backends import LocalBackend
    from medtune.models.loader import refuse_output_in_model_folder

    if eval_args.system_prompt:
        raise ConfigError("ppl scores raw text, rendered through no chat template: --system_prompt does not apply")
    refuse_output_in_model_folder(eval_args.output_dir, model_args.model_name_or_path, eval_args.adapter_name_or_path)
    documents, location = perplexity_documents(eval_args)
    logger.info("perplexity on %d documents of %s", len(documents), location)
    if eval_args.limit is not None:
        documents = documents[: eval_args.limit]
    # perplexity scores raw text: a base model without a chat template is fine
    backend = LocalBackend(model_args.model_name_or_path, eval_args.adapter_name_or_path, model_args.template,
                           model_args.torch_dtype, model_args.trust_remote_code, eval_args.batch_size,
                           model_args.tokenizer_name_or_path, model_args.attn_implementation,
                           needs_chat_template=False)
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
    results = {"model": backend.name, "data": location, "documents": stats.documents, "tokens": stats.tokens,
               "predicted_tokens": total_tokens, "loss": loss, "perplexity": math.exp(min(loss, 700)),
               "block_size": eval_args.block_size}
    output_dir = Path(eval_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "perplexity.json").write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")
    logger.info("perplexity %.3f over %d tokens -> %s", results["perplexity"], total_tokens,
                output_dir / "perplexity.json")
    return results

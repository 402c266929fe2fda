"""CMB-Exam evaluation speed through the path users run (`medtune eval cmb-exam`), one JSON line per measurement.

    python benchmarks/eval_throughput.py [--batch_size 8] [--generate_items 8] [--max_new_tokens 512]
                                         [--lm_eval_python /work/venv-lmeval/bin/python]

Each medtune figure is `medtune eval cmb-exam` run in this process (`medtune.cli.main`) on the bundled test items,
timed inside its scoring loop (`runner.predict_exam`: prompts, chat template, tokenizing, forward passes, the
predictions file), so model loading is left out and nothing private is called:
- likelihood on the single-choice items, then on the multiple-choice items;
- with `--lm_eval_python PATH` (a Python with lm-evaluation-harness installed, e.g. a venv made with
  `--system-site-packages`): lm-evaluation-harness's `loglikelihood` in that interpreter on the same model folder,
  the same batch size and the same rendered prompts and option letters -- its scoring loop's items/s, how many
  predictions equal medtune's, and medtune's items/s divided by lm-eval's;
- generate mode on `--generate_items` items, stopping naturally and forced to use all of `--max_new_tokens`.
The last line gives likelihood's speed-up over each generate figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CMB = REPO / "data" / "eval" / "cmb"


def timed_cmb_exam(arguments: list[str], force_new_tokens: int = 0) -> tuple[float, dict[str, str]]:
    """Run `medtune eval cmb-exam ARGUMENTS` here; the seconds its scoring loop took and its answers.

    `force_new_tokens` makes every generate call produce that many tokens (the budget a reasoning reply uses)."""
    from medtune import cli
    from medtune.eval import runner

    scoring_loop, make_backend, spent = runner.predict_exam, runner.make_backend, []

    def timed_loop(*args, **kwargs):
        started = time.perf_counter()
        answers = scoring_loop(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return answers

    def forcing_backend(*args, **kwargs):
        backend = make_backend(*args, **kwargs)
        generate = backend.model.generate

        def full_length(*gen_args, **gen_kwargs):
            return generate(*gen_args, **{**gen_kwargs, "min_new_tokens": force_new_tokens})

        backend.model.generate = full_length
        return backend

    runner.predict_exam = timed_loop
    runner.make_backend = forcing_backend if force_new_tokens else make_backend
    try:
        code = cli.main(["eval", "cmb-exam", *arguments])
    finally:
        runner.predict_exam, runner.make_backend = scoring_loop, make_backend
    if code != 0:
        raise SystemExit(f"medtune eval cmb-exam failed (exit {code})")
    output_dir = Path(arguments[arguments.index("--output_dir") + 1])
    answers = json.loads((output_dir / "answers.json").read_text(encoding="utf-8"))
    return spent[0], {a["id"]: a["model_answer"] for a in answers}


def write_items(items: list[dict], path: Path) -> Path:
    path.write_text(json.dumps(items, ensure_ascii=False), encoding="utf-8")
    return path


def lm_eval_requests(model_path: str, data: Path) -> list[dict]:
    """For each item: the prompt medtune renders and each option letter as the template writes it after that
    prompt (e.g. "\\nA" after GLM-4-9B-Chat's generation prompt, which ends without the newline)."""
    from medtune.data.loading import load_records
    from medtune.eval.cmb import item_messages, shown_options
    from medtune.models.loader import load_chat_template, load_tokenizer

    template = load_chat_template(model_path, load_tokenizer(model_path, False))
    requests = []
    for item in load_records(data, "exam")[0]:
        continuations = {}
        for letter in shown_options(item):
            context, reply = template.prompt_and_reply(item_messages(item, []), letter)
            continuations[letter] = reply[:reply.index(letter) + 1]
        requests.append({"id": item.id, "context": context, "continuations": continuations})
    return requests


def lm_eval_worker(request_file: str) -> int:
    """Runs under --lm_eval_python: lm-evaluation-harness's loglikelihood on the requests, timed."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    job = json.loads(Path(request_file).read_text(encoding="utf-8"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # the rendered prompt already holds the template's prefix ([gMASK]<sop>): no special tokens added on top
    lm = HFLM(pretrained=job["model"], batch_size=job["batch_size"], device=device, add_bos_token=False,
              dtype="bfloat16" if device == "cuda" else "float32")
    instances, owners = [], []
    for item in job["requests"]:
        for letter, continuation in item["continuations"].items():
            instances.append(Instance("loglikelihood", {}, (item["context"], continuation), len(instances)))
            owners.append((item["id"], letter))
    lm.loglikelihood(instances[:8], disable_tqdm=True)  # warm-up, as medtune gets
    started = time.perf_counter()
    results = lm.loglikelihood(instances, disable_tqdm=True)
    elapsed = time.perf_counter() - started
    best: dict[str, tuple[float, str]] = {}
    for (item_id, letter), (log_prob, _) in zip(owners, results):
        if item_id not in best or log_prob > best[item_id][0]:
            best[item_id] = (log_prob, letter)
    print(json.dumps({"seconds": elapsed, "answers": {k: v[1] for k, v in best.items()}}))
    return 0


def lm_eval_run(python: str, job_file: Path) -> tuple[float, dict[str, str]]:
    """Seconds lm-evaluation-harness's scoring loop took in a fresh `python`, and its answers."""
    done = subprocess.run([python, __file__, "--lm_eval_worker", str(job_file)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"lm-evaluation-harness run failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["seconds"], result["answers"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None, help="Model folder (default: the embedded tiny GLM-4).")
    parser.add_argument("--items", type=int, default=None, help="Use only the first N test items.")
    parser.add_argument("--generate_items", type=int, default=8, help="Items for generate mode (slow).")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lm_eval_python", default=None, help="A Python with lm-eval installed: compare with it.")
    parser.add_argument("--repeats", type=int, default=5, help="Rounds of the single-choice scoring loops (best kept).")
    parser.add_argument("--lm_eval_worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lm_eval_worker:
        return lm_eval_worker(args.lm_eval_worker)
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr), tempfile.TemporaryDirectory() as scratch_name:
        from medtune.models.loader import resolve_model_path

        scratch = Path(scratch_name)
        model_path = resolve_model_path(args.model_name_or_path)
        items = json.loads((CMB / "test.json").read_text(encoding="utf-8"))[: args.items]
        single = [i for i in items if i["question_type"] != "多项选择题"]
        multiple = [i for i in items if i["question_type"] == "多项选择题"]
        common = ["--model_name_or_path", model_path, "--batch_size", str(args.batch_size)]

        def cmb_exam(name: str, subset: list[dict], *extra: str, force_new_tokens: int = 0):
            data = write_items(subset, scratch / f"{name}.json")
            return timed_cmb_exam([*common, "--data_dir", str(data), "--output_dir", str(scratch / name), *extra],
                                  force_new_tokens)

        cmb_exam("warm_up", single[: args.batch_size])
        if args.lm_eval_python:
            job = {"model": model_path, "batch_size": args.batch_size,
                   "requests": lm_eval_requests(model_path, write_items(single, scratch / "single.json"))}
            job_file = scratch / "lm_eval_job.json"
            job_file.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
        # The two scoring loops take turns and each keeps its best round, so a busy machine skews neither.
        ours, theirs = float("inf"), float("inf")
        for round_ in range(args.repeats):
            seconds, answers = cmb_exam(f"single_{round_}", single, "--mode", "likelihood")
            ours = min(ours, seconds)
            if args.lm_eval_python:
                seconds, lm_eval_answers = lm_eval_run(args.lm_eval_python, job_file)
                theirs = min(theirs, seconds)
        speeds = {"单项选择题": len(single) / ours}
        print(json.dumps({"mode": "likelihood", "question_type": "单项选择题", "items": len(single),
                          "batch_size": args.batch_size, "items_per_s": round(speeds["单项选择题"], 1)}),
              file=out, flush=True)
        if args.lm_eval_python:
            print(json.dumps({"mode": "lm-eval loglikelihood", "question_type": "单项选择题", "items": len(single),
                              "batch_size": args.batch_size, "items_per_s": round(len(single) / theirs, 1),
                              "same_prediction": sum(lm_eval_answers[k] == v for k, v in answers.items()),
                              "medtune_likelihood_vs_lm_eval": round(theirs / ours, 2)}), file=out, flush=True)
        if multiple:
            seconds, _ = cmb_exam("multiple", multiple, "--mode", "likelihood")
            speeds["多项选择题"] = len(multiple) / seconds
            print(json.dumps({"mode": "likelihood", "question_type": "多项选择题", "items": len(multiple),
                              "batch_size": args.batch_size, "items_per_s": round(speeds["多项选择题"], 1)}),
                  file=out, flush=True)

        subset = items[: args.generate_items]
        generate = {}
        # A random tiny model often emits a stop token within a few tokens; a real model answering with reasoning
        # uses much of its budget. Both ends are measured: natural stopping, and the full max_new_tokens.
        for label, forced in (("natural_stop", 0), ("full_budget", args.max_new_tokens)):
            seconds, _ = cmb_exam(f"generate_{label}", subset, "--mode", "generate", "--max_new_tokens",
                                  str(args.max_new_tokens), force_new_tokens=forced)
            generate[label] = len(subset) / seconds
            print(json.dumps({"mode": "generate", "length": label, "items": len(subset),
                              "max_new_tokens": args.max_new_tokens, "items_per_s": round(generate[label], 3)}),
                  file=out, flush=True)
        all_items_per_s = len(items) / sum(len(s) / speeds[k] for k, s in (("单项选择题", single),
                                                                          ("多项选择题", multiple)) if s)
        print(json.dumps({f"likelihood_speedup_vs_{k}": round(all_items_per_s / v, 1) for k, v in generate.items()}),
              file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

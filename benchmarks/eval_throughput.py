"""CMB-Exam evaluation speed on the embedded tiny model, one JSON line per mode.

    python benchmarks/eval_throughput.py [--items 60] [--generate_items 8] [--max_new_tokens 512]

likelihood: one batched forward pass per group of questions (multiple choice: every letter set scored);
generate: greedy decoding with max_new_tokens as in the official configuration, then answer extraction.
The last line gives likelihood's speed-up per item over generate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compare_lm_eval(backend, choices, our_answers: list[str], our_items_per_s: float) -> dict:
    """lm-evaluation-harness's loglikelihood on exactly the candidates medtune scores."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    # the rendered prompt already holds the template's prefix ([gMASK]<sop>): no special tokens added on top
    lm = HFLM(pretrained=backend.model, tokenizer=backend.tokenizer, batch_size=backend.batch_size, device="cpu",
              add_bos_token=False)
    requests, owners = [], []
    for index, choice in enumerate(choices):
        prompt_ids, candidates, single_token = backend._candidate_sequences(choice)
        context = backend.tokenizer.decode(prompt_ids)
        for name, reply in candidates:
            continuation = backend.tokenizer.decode(reply[:1] if single_token else reply)
            requests.append(Instance("loglikelihood", {}, (context, continuation), len(requests)))
            owners.append((index, name))
    started = time.perf_counter()
    results = lm.loglikelihood(requests, disable_tqdm=True)
    elapsed = time.perf_counter() - started
    best: dict[int, tuple[float, str]] = {}
    for (index, name), (logprob, _) in zip(owners, results):
        if index not in best or logprob > best[index][0]:
            best[index] = (logprob, name)
    agree = sum(best[i][1] == answer for i, answer in enumerate(our_answers))
    return {"mode": "lm-eval loglikelihood", "items": len(choices), "items_per_s": round(len(choices) / elapsed, 2),
            "same_prediction": agree, "medtune_speedup": round(our_items_per_s / (len(choices) / elapsed), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=60, help="Items for likelihood mode.")
    parser.add_argument("--generate_items", type=int, default=8, help="Items for generate mode (slow).")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--lm_eval", action="store_true", help="Also run lm-evaluation-harness on the same items.")
    args = parser.parse_args()
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        from medtune.data.loading import load_records
        from medtune.eval.backends import Choice, LocalBackend
        from medtune.eval.cmb import extract_answer, item_messages

        items, _ = load_records(REPO / "data" / "eval" / "cmb" / "test.json", "exam")
        backend = LocalBackend(None, batch_size=args.batch_size)
        subset = items[: args.items]
        choices = [Choice(item_messages(i, []), "".join(i.options), i.multiple) for i in subset]
        backend.choose(choices[:2])  # warm-up
        started = time.perf_counter()
        ours = backend.choose(choices)
        likelihood = len(subset) / (time.perf_counter() - started)
        print(json.dumps({"mode": "likelihood", "items": len(subset),
                          "multiple_choice_items": sum(i.multiple for i in subset),
                          "items_per_s": round(likelihood, 2)}), file=out, flush=True)
        if args.lm_eval:
            print(json.dumps(compare_lm_eval(backend, choices, [a for a, _ in ours], likelihood)), file=out, flush=True)

        subset = items[: args.generate_items]
        speeds = {}
        # A random tiny model often emits a stop token within a few tokens; a real model answering with reasoning
        # uses much of its budget. Both ends are measured: natural stopping, and the full max_new_tokens.
        for label, minimum in (("natural_stop", 0), ("full_budget", args.max_new_tokens)):
            started = time.perf_counter()
            replies = backend.generate([item_messages(i, []) for i in subset], args.max_new_tokens, minimum)
            speeds[label] = len(subset) / (time.perf_counter() - started)
            [extract_answer(r, "".join(i.options)) for i, r in zip(subset, replies)]
            tokens = sum(len(backend.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies) / len(replies)
            print(json.dumps({"mode": "generate", "length": label, "items": len(subset),
                              "max_new_tokens": args.max_new_tokens, "mean_reply_tokens": round(tokens, 1),
                              "items_per_s": round(speeds[label], 3)}), file=out, flush=True)
        print(json.dumps({f"likelihood_speedup_vs_{k}": round(likelihood / v, 1) for k, v in speeds.items()}),
              file=out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

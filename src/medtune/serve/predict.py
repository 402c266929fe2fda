"""`medtune predict`: replies for every prompt or conversation of a file, written as JSON Lines, resumably.

Prompts are rendered by the model's ChatTemplate (`prompt_ids`), as in training and evaluation. Generation runs in
fixed batches of the input order; a re-run skips the ids already in the output and, for a batch that was only partly
written when the run was killed, generates the whole batch again and writes the missing lines: every batch then has
the same members (and padding) as in an uninterrupted run, so greedy replies are bit-identical, and sampled replies
are seeded per prompt (`LocalBackend.generate_ids`, vLLM's per-request seed).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from medtune.data.loading import empty_file_problem
from medtune.data.readers import raise_if_problems, read_json_records
from medtune.data.records import PROMPT_FORMATS, Prompt, RecordProblem, detect_prompt_format, to_prompt
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
from medtune.optional import require_vllm

logger = logging.getLogger(__name__)

DESCRIPTION = ("Replies for every prompt or conversation of a .jsonl/.json file ({id, prompt}, ShareGPT, OpenAI "
               "messages or Alpaca), one output line {id, replies} per record; re-running continues where it stopped.")
# vLLM builds its LoRA kernels for these ranks; the adapter's rank is rounded up to the next one.
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def read_prompts(path: str) -> list[Prompt]:
    """Every record of the input file as a Prompt; all problems (and repeated ids) raised together as DataError."""
    location = Path(path).expanduser()
    if not location.is_file():
        raise DataError([Problem(str(location), None, None, "no such file")])
    problems: list[Problem] = []
    raw = list(read_json_records(location, problems))
    if not raw and not problems:
        problems.append(empty_file_problem(location))
    prompts: list[Prompt] = []
    first_line: dict[str, int] = {}
    for line, record in raw:
        try:
            prompt = to_prompt(record, prompt_format(record), line)
        except RecordProblem as exc:
            problems.append(Problem(str(location), line, exc.field, exc.message))
            continue
        key = str(prompt.id)
        if key in first_line:
            problems.append(Problem(str(location), line, "id", f"{prompt.id!r} repeats the id of line "
                                                               f"{first_line[key]}"))
            continue
        first_line[key] = line
        prompt.source = f"{location}:{line}"
        prompts.append(prompt)
    raise_if_problems(problems)
    return prompts


def prompt_format(record) -> str:
    fmt = detect_prompt_format(record)
    if fmt is None:
        found = ", ".join(sorted(record)) if isinstance(record, dict) else type(record).__name__
        raise RecordProblem(None, f"not a prompt (fields: {found}); expected prompt, conversations (ShareGPT), "
                                  f"messages (OpenAI) or instruction (Alpaca): one of {', '.join(PROMPT_FORMATS)}")
    return fmt


class TransformersGenerator:
    """Replies from transformers `generate` on this machine (LocalBackend: greedy batches, per-prompt seeds)."""

    def __init__(self, model_args, adapter: str | None, batch_size: int, system_prompt: str | None = None):
        from medtune.eval.backends import LocalBackend

        self.backend = LocalBackend(model_args.model_name_or_path, adapter, model_args.template,
                                    model_args.torch_dtype, model_args.trust_remote_code, batch_size,
                                    model_args.tokenizer_name_or_path, model_args.attn_implementation,
                                    system_prompt=system_prompt)

    def replies(self, conversations: list[list[dict]], generation_args) -> list[list[str]]:
        n = generation_args.num_return_sequences
        ids = self.backend.generate_ids(conversations, generation_args.max_new_tokens, num_samples=n,
                                        temperature=generation_args.temperature, top_p=generation_args.top_p,
                                        seed=generation_args.seed)
        texts = [self.backend.decode(reply) for reply in ids]
        return [texts[k:k + n] for k in range(0, len(texts), n)]


def lora_rank(adapter: str) -> int:
    config = json.loads((Path(adapter) / "adapter_config.json").read_text(encoding="utf-8"))
    return int(config.get("r", 8))


class VLLMGenerator:
    """Replies from vLLM's offline engine (`vllm.LLM`), fed the token ids our ChatTemplate renders, so vLLM's own
    chat-template handling never runs; a LoRA adapter is applied per request (`LoRARequest`), unmerged."""

    def __init__(self, model_args, adapter: str | None, tensor_parallel_size: int, seed: int,
                 system_prompt: str | None = None):
        from vllm import LLM

        from medtune.eval.backends import load_tokenizer_and_template
        from medtune.models.loader import resolve_model_path

        if model_args.attn_implementation:
            raise ConfigError("--attn_implementation applies to --backend hf; vLLM chooses its own attention kernels")
        model_path = resolve_model_path(model_args.model_name_or_path)
        tokenizer, self.template = load_tokenizer_and_template(model_path, adapter, model_args.template,
                                                               model_args.trust_remote_code,
                                                               model_args.tokenizer_name_or_path,
                                                               system_prompt=system_prompt)
        lora = {}
        if adapter:
            rank = lora_rank(adapter)
            lora = {"enable_lora": True, "max_lora_rank": next((r for r in VLLM_LORA_RANKS if r >= rank), rank)}
        self.llm = LLM(model=model_path, tokenizer=tokenizer.name_or_path, dtype=model_args.torch_dtype,
                       trust_remote_code=model_args.trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                       seed=seed, **lora)
        self.lora_request = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self.lora_request = LoRARequest("adapter", 1, str(Path(adapter).resolve()))

    def replies(self, conversations: list[list[dict]], generation_args) -> list[list[str]]:
        from vllm import SamplingParams

        params = SamplingParams(n=generation_args.num_return_sequences, temperature=generation_args.temperature,
                                top_p=generation_args.top_p, max_tokens=generation_args.max_new_tokens,
                                seed=generation_args.seed, stop_token_ids=self.template.stop_token_ids,
                                skip_special_tokens=True)
        prompts = [{"prompt_token_ids": self.template.prompt_ids(messages)} for messages in conversations]
        outputs = self.llm.generate(prompts, params, lora_request=self.lora_request, use_tqdm=False)
        return [[completion.text.strip() for completion in output.outputs] for output in outputs]


def require_backend(backend: str) -> None:
    if backend == "vllm":
        require_vllm()


def make_generator(model_args, adapter_args, generation_args, predict_args):
    if predict_args.backend == "vllm":
        return VLLMGenerator(model_args, adapter_args.adapter_name_or_path, predict_args.tensor_parallel_size,
                             generation_args.seed, predict_args.system_prompt)
    return TransformersGenerator(model_args, adapter_args.adapter_name_or_path, predict_args.batch_size,
                                 predict_args.system_prompt)


def run_settings(model_args, adapter_args, generation_args, predict_args) -> dict:
    """What the replies depend on: the model, adapter and template (with a fingerprint of their weights), the
    device, the backend and every decoding option; batch size is left out (it changes no greedy reply's tokens
    beyond floating-point noise, and a resume keeps the batches anyway)."""
    import dataclasses

    import torch

    from medtune.models.loader import resolve_model_path

    model, adapter = resolve_model_path(model_args.model_name_or_path), adapter_args.adapter_name_or_path
    return {"model": model, "adapter": adapter, "template": model_args.template,
            "tokenizer": model_args.tokenizer_name_or_path, "torch_dtype": model_args.torch_dtype,
            "device": "cuda" if torch.cuda.is_available() else "cpu", "backend": predict_args.backend,
            "model_weights": folder_fingerprint(model), "adapter_weights": folder_fingerprint(adapter),
            **dataclasses.asdict(generation_args),
            # only when set, so outputs written before the option existed can still be continued
            **({"system_prompt": predict_args.system_prompt} if predict_args.system_prompt else {})}


def check_same_settings(output: Path, settings: dict, answered: int) -> None:
    """Refuse to append replies made another way to an output that already holds some (the file is the user's:
    it is neither mixed nor moved); record the settings of a new output beside it (`OUTPUT.settings.json`)."""
    settings_file = output.with_name(output.name + ".settings.json")
    previous = read_settings(settings_file)
    if answered and previous is not None and previous != settings:
        changed = ", ".join(changed_settings(previous, settings))
        raise ConfigError(f"{output}: its {answered} replies were made with other settings (changed: "
                          f"{changed}; see {settings_file.name}); resume with the same options or choose "
                          "another --output")
    if previous != settings:
        write_atomically(settings_file, json.dumps(settings, indent=2, ensure_ascii=False).encode())


def run_predict(model_args, adapter_args, generation_args, predict_args) -> int:
    """Answer every prompt not yet in the output; returns how many lines were written."""
    prompts = read_prompts(predict_args.input)  # bad input stops here, before a model loads or a file is written
    require_backend(predict_args.backend)
    output = Path(predict_args.output).expanduser()
    if output.resolve() == Path(predict_args.input).expanduser().resolve():
        raise ConfigError(f"{output}: --output is the --input file; choose another file")
    output.parent.mkdir(parents=True, exist_ok=True)
    done = read_predictions(output)  # a line cut by a kill is dropped here and its prompt answered again
    check_same_settings(output, run_settings(model_args, adapter_args, generation_args, predict_args), len(done))
    size = predict_args.batch_size
    batches = [prompts[k:k + size] for k in range(0, len(prompts), size)]
    todo = [batch for batch in batches if any(str(p.id) not in done for p in batch)]
    logger.info("%d prompts in %s: %d already answered in %s", len(prompts), predict_args.input,
                sum(str(p.id) in done for p in prompts), output)
    written = 0
    if todo:
        generator = make_generator(model_args, adapter_args, generation_args, predict_args)
        bar = progress(len(prompts), len(prompts) - sum(str(p.id) not in done for b in todo for p in b), "predict")
        for batch in todo:
            replies = generator.replies([p.messages for p in batch], generation_args)
            missing = [{"id": p.id, "replies": r} for p, r in zip(batch, replies) if str(p.id) not in done]
            append_lines(output, missing)
            written += len(missing)
            bar.update(len(missing))
        bar.close()
    logger.info("wrote %d replies to %s", written, output)
    return written

"""What evaluation talks to: a local model folder (optionally + a LoRA adapter, unmerged) or an OpenAI-compatible
endpoint (vLLM, `medtune serve`). Both render prompts through the same ChatTemplate as training.

Likelihood mode (`LocalBackend.choose`) scores every candidate answer as the reply the chat template renders for it
in training (`ChatTemplate.prompt_and_reply`), tokenized on its own as training tokenizes it. The reply tokens that
every candidate shares -- e.g. the "\n" that starts a GLM-4-9B-Chat reply, whose generation prompt ends in
`<|assistant|>` with no newline -- are appended to the prompt, so the answer is scored at the position where the
model writes it, whatever the template puts before it.

- Single choice (单项选择题): the log-probability of each option letter as the first answer token, which is how
  lm-evaluation-harness scores a one-token continuation (predictions identical, checked by the benchmark), in
  batches of exactly `batch_size` prompts whose common beginning runs once (`next_token_log_probs`).
- Multiple choice (多项选择题): the candidates are the sets of two or more option letters (CMB's multiple-choice
  answers always have two or more; a single letter is never right), each written as the sorted letters plus the
  template's stop marker, ranked by the mean log-probability per token of that reply. Why the mean: a summed
  log-probability loses something with every extra token, so it favours the shortest sets whatever the model
  believes; the per-token mean (the length normalisation GPT-3 used for multi-token answers) removes that bias,
  and since the stop marker is one of the tokens the model still says where its answer ends. The prompt runs once
  and its KV cache is shared by the candidates, `batch_size` of them per forward pass.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import ConfigError, MedtuneError

logger = logging.getLogger(__name__)


@dataclass
class Choice:
    """A multiple-choice question as the backend sees it."""

    messages: list[dict[str, str]]
    letters: str  # the option letters offered, e.g. "ABCDE"
    multiple: bool  # the answer is a set of letters (多项选择题)


def answer_candidates(letters: str, multiple: bool) -> list[str]:
    """Every answer a model could give: one letter, or (multiple choice) every sorted set of two or more letters
    (every set when fewer than two letters are offered)."""
    if not multiple:
        return list(letters)
    smallest = 2 if len(letters) >= 2 else 1
    return ["".join(c) for size in range(smallest, len(letters) + 1) for c in itertools.combinations(letters, size)]


@dataclass
class ScoringPlan:
    """What one question's candidates are scored from."""

    context: list[int]  # the prompt ids plus the reply tokens every candidate shares
    candidates: list[tuple[str, list[int]]]  # (answer, its reply tokens after the shared ones)
    first_token_decides: bool  # single choice whose candidates differ in their first token


def common_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens all sequences share, leaving every sequence at least one token of its own."""
    return min([common_length(sequences[0], s) for s in sequences] + [len(s) - 1 for s in sequences])


def shared_start_length(prompts: list[list[int]]) -> int:
    """How many leading tokens to run once per distinct start of `prompts` rather than once per prompt: the length
    that saves the most tokens, leaving every prompt at least one token of its own (0: no start worth sharing)."""
    limit = min(len(p) for p in prompts) - 1
    ordered = sorted(prompts)
    agree = [common_length(a, b) for a, b in zip(ordered, ordered[1:])]
    best, best_saving = 0, 0
    for length in sorted({min(n, limit) for n in agree} | {limit}):
        # in sorted order, each neighbour agreeing on fewer than `length` tokens begins another distinct start
        saving = length * (len(prompts) - 1 - sum(n < length for n in agree))
        if saving > best_saving:
            best, best_saving = length, saving
    return best


def load_tokenizer_and_template(model_path: str, adapter: str | None, template: str | None,
                                trust_remote_code: bool = False, tokenizer_path: str | None = None,
                                needs_chat_template: bool = True, system_prompt: str | None = None):
    """(tokenizer, ChatTemplate) for inference on `model_path` (+ `adapter`): the one way every inference path
    (evaluation, chat, predict, serve, vLLM) finds the tokenizer and chat template a model was trained with;
    `system_prompt` goes to conversations that bring no system message."""
    from medtune.models.loader import load_chat_template, load_tokenizer

    # An explicit --tokenizer_name_or_path wins; else an adapter trained by medtune carries the tokenizer and
    # chat template it was trained with.
    tokenizer_source = tokenizer_path or (
        adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_path)
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code)
    # perplexity scores raw text and needs no chat template (a base model may have none)
    chat_template = (load_chat_template(model_path, tokenizer, template, system_prompt) if needs_chat_template
                     else None)
    return tokenizer, chat_template


class LocalBackend:
    """A model folder on this machine (GPU if available), scored in batches."""

    def __init__(self, model_path: str | None, adapter: str | None = None, template: str | None = None,
                 torch_dtype: str = "auto", trust_remote_code: bool = False, batch_size: int = 8,
                 tokenizer_path: str | None = None, attn_implementation: str | None = None,
                 needs_chat_template: bool = True, system_prompt: str | None = None):
        import torch

        from medtune.models.loader import load_model, resolve_model_path

        model_path = resolve_model_path(model_path)
        self.tokenizer, self.template = load_tokenizer_and_template(model_path, adapter, template, trust_remote_code,
                                                                    tokenizer_path, needs_chat_template,
                                                                    system_prompt)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch_dtype if torch_dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
        model = load_model(model_path, torch_dtype=dtype, trust_remote_code=trust_remote_code,
                           attn_implementation=attn_implementation)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        self.model = model.to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.name = model_path if not adapter else f"{model_path}+{adapter}"

    # -- likelihood -------------------------------------------------------------------------------------------

    @functools.cached_property
    def _reply_frames(self) -> set[tuple[str, str]]:
        """(head, tail) pairs seen to frame every answer the same way in this template's replies."""
        return set()

    _kept_starts: tuple[int, list[tuple[int, ...]], object] | None = None  # see _starts_for

    @functools.cached_property
    def cache_keyword(self) -> str:
        """The KV-cache argument and output name: `cache` in newer transformers 5.x, `past_key_values` before."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def reply_texts(self, messages: list[dict[str, str]], names: list[str]) -> tuple[str, list[str]]:
        """The rendered prompt and each candidate's reply text exactly as the template renders it in training."""
        prompt_text, first = self.template.prompt_and_reply(messages, names[0])
        head, found, tail = first.partition(names[0])
        # Templates write a reply as head + answer + tail (e.g. "\n" + "A" + stop marker). A second rendering
        # confirms that once per (head, tail); then the other candidates need no rendering of their own.
        if found and (head, tail) not in self._reply_frames and len(names) > 1:
            if self.template.prompt_and_reply(messages, names[-1])[1] == head + names[-1] + tail:
                self._reply_frames.add((head, tail))
        if found and (head, tail) in self._reply_frames:
            return prompt_text, [head + name + tail for name in names]
        return prompt_text, [first] + [self.template.prompt_and_reply(messages, name)[1] for name in names[1:]]

    def scoring_plans(self, choices: list[Choice]) -> list[ScoringPlan | None]:
        """Each question's context and candidate tokens (None: no option to choose); one tokenizer call for all."""
        asked = [(choice, answer_candidates(choice.letters, choice.multiple)) for choice in choices if choice.letters]
        texts = [self.reply_texts(choice.messages, names) for choice, names in asked]
        tokenize = self.template.tokenizer
        prompts = tokenize([prompt for prompt, _ in texts], add_special_tokens=False)["input_ids"]
        flat = tokenize([reply for _, replies in texts for reply in replies], add_special_tokens=False)["input_ids"]
        built, cursor = [], 0
        for (choice, names), prompt in zip(asked, prompts):
            reply_ids, cursor = flat[cursor:cursor + len(names)], cursor + len(names)
            shared = shared_prefix_length(reply_ids)
            candidates = [(name, ids[shared:]) for name, ids in zip(names, reply_ids)]
            first_token_decides = not choice.multiple and len({ids[0] for _, ids in candidates}) == len(candidates)
            built.append(ScoringPlan(prompt + reply_ids[0][:shared], candidates, first_token_decides))
        plans = iter(built)
        return [next(plans) if choice.letters else None for choice in choices]

    def choose(self, choices: list[Choice]) -> list[tuple[str, dict[str, float]]]:
        """For each question, the highest-scoring answer and every candidate's score (module docstring)."""
        scores: list[dict[str, float]] = [{} for _ in choices]
        by_first_token = []
        for index, (choice, plan) in enumerate(zip(choices, self.scoring_plans(choices))):
            if plan is None:
                continue  # no option left to choose (e.g. --official dropped them all): scored as unanswered
            if plan.first_token_decides:
                by_first_token.append((index, plan))
            else:
                scores[index] = self.score_replies(plan, mean=choice.multiple)
        for start in range(0, len(by_first_token), self.batch_size):
            batch = by_first_token[start:start + self.batch_size]
            last = self.next_token_log_probs([plan.context for _, plan in batch])
            for row, (index, plan) in enumerate(batch):
                scores[index] = dict(zip([name for name, _ in plan.candidates],
                                         last[row, [ids[0] for _, ids in plan.candidates]].tolist()))
        return [(max(s, key=s.get) if s else "", s) for s in scores]

    def next_token_log_probs(self, prompts: list[list[int]]):
        """Log-softmax over the vocabulary after each prompt, a [rows, vocab] tensor on the CPU.

        Prompts of one exam class start alike (template head, CMB instruction, shared few-shot examples): each
        distinct start runs once and its KV cache serves every prompt that begins with it (`shared_start_length`);
        the starts are kept for the next batch, which usually begins with the same ones. The rest of each prompt is
        right-padded, which causal attention never lets a real token see, so no attention mask is needed; only each
        prompt's last position goes through the output head."""
        import torch

        length, starts, cache = self._starts_for(prompts)
        rests = [prompt[length:] for prompt in prompts]
        input_ids = torch.full((len(rests), max(map(len, rests))), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, rest in enumerate(rests):
            input_ids[row, :len(rest)] = torch.tensor(rest)
        last = torch.tensor([len(rest) - 1 for rest in rests])
        keep = torch.unique(last)  # sorted: each row's own last position is column searchsorted(keep, last)
        if cache is not None:
            own_start = [starts.index(tuple(prompt[:length])) for prompt in prompts]
            cache.batch_select_indices(torch.tensor(own_start, device=self.device))
        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device), use_cache=cache is not None,
                                logits_to_keep=keep.to(self.device),
                                **({self.cache_keyword: cache} if cache is not None else {})).logits
        if cache is not None:  # back to one row per start this batch used, kept for the next batch
            used = sorted(set(own_start))
            cache.crop(-input_ids.shape[1])
            cache.batch_select_indices(torch.tensor([own_start.index(k) for k in used], device=self.device))
            self._kept_starts = (length, [starts[k] for k in used], cache)
        rows = logits[torch.arange(len(rests)), torch.searchsorted(keep, last).to(self.device)]
        return torch.log_softmax(rows.float(), dim=-1).cpu()

    def _starts_for(self, prompts: list[list[int]]) -> tuple[int, list[tuple[int, ...]], object | None]:
        """(start length, the distinct starts, their KV cache with one row each); (0, [], None) when no start is
        worth sharing. The previous batch's starts serve again when every prompt begins with one of them."""
        import torch

        kept, self._kept_starts = self._kept_starts, None  # the cache is about to change: kept again once restored
        if kept and all(len(p) > kept[0] and tuple(p[:kept[0]]) in kept[1] for p in prompts):
            return kept
        length = shared_start_length(prompts)
        if not length:
            return 0, [], None
        starts = list(dict.fromkeys(tuple(prompt[:length]) for prompt in prompts))
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor(starts, device=self.device), use_cache=True, logits_to_keep=1)
        return length, starts, out[self.cache_keyword]

    def score_replies(self, plan: ScoringPlan, mean: bool) -> dict[str, float]:
        """Each candidate's summed (or, with `mean`, per-token mean) log-probability after the context; the context
        runs once and its KV cache serves every group of `batch_size` candidates."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([plan.context], device=self.device), use_cache=True,
                             logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1).cpu()
        totals = [first[ids[0]].item() for _, ids in plan.candidates]
        cache = out[self.cache_keyword]
        for start in range(0, len(plan.candidates), self.batch_size):
            group = plan.candidates[start:start + self.batch_size]
            width = max(len(ids) for _, ids in group) - 1  # each reply token is predicted from the ones before it
            if width <= 0:
                continue
            fed = torch.full((len(group), width), self.tokenizer.pad_token_id, dtype=torch.long)
            targets = torch.zeros((len(group), width), dtype=torch.long)
            real = torch.zeros((len(group), width), dtype=torch.bool)
            for row, (_, ids) in enumerate(group):
                fed[row, :len(ids) - 1] = torch.tensor(ids[:-1])
                targets[row, :len(ids) - 1] = torch.tensor(ids[1:])
                real[row, :len(ids) - 1] = True
            cache.batch_repeat_interleave(len(group))
            with torch.no_grad():  # right-padded: causal attention keeps the padding out of every real token
                logits = self.model(input_ids=fed.to(self.device), use_cache=True,
                                    **{self.cache_keyword: cache}).logits
            cache.crop(-width)  # back to the shared context, one row, for the next group
            cache.batch_select_indices(torch.tensor([0], device=self.device))
            picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.to(self.device).unsqueeze(-1))
            sums = (picked.squeeze(-1).cpu() * real).sum(-1).tolist()
            for row, value in enumerate(sums):
                totals[start + row] += value
        if mean:
            totals = [total / len(ids) for total, (_, ids) in zip(totals, plan.candidates)]
        return {name: total for total, (name, _) in zip(totals, plan.candidates)}

    # -- generation ---------------------------------------------------------------------------------------------

    def decoding_options(self, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0) -> dict:
        """`model.generate` keyword arguments: greedy at temperature 0, else sampled; stops at the template's stop
        tokens."""
        sampled = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
            "do_sample": False}
        return {**sampled, "max_new_tokens": max_new_tokens, "eos_token_id": self.template.stop_token_ids,
                "pad_token_id": self.tokenizer.pad_token_id}

    def reply_ids(self, generated) -> list[int]:
        """A generated row's reply: the tokens before its first stop token (the rest is the stop and padding)."""
        stops = set(self.template.stop_token_ids)
        ids = [int(token) for token in generated]
        return next((ids[:k] for k, token in enumerate(ids) if token in stops), ids)

    def decode(self, reply_ids: list[int]) -> str:
        return self.tokenizer.decode(reply_ids, skip_special_tokens=True).strip()

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int = 512,
                 min_new_tokens: int = 0, num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 42) -> list[str]:
        """Replies in conversation order: greedy, in left-padded batches (`min_new_tokens` only for benchmarks); or,
        with `num_samples` N > 1, N sampled replies per conversation (conversation-major, as `num_return_sequences`).
        See `generate_ids`."""
        sampled = temperature if num_samples > 1 else 0.0
        return [self.decode(ids) for ids in self.generate_ids(conversations, max_new_tokens, min_new_tokens,
                                                              num_samples, sampled, top_p, seed)]

    def generate_ids(self, conversations: list[list[dict[str, str]]], max_new_tokens: int = 512,
                     min_new_tokens: int = 0, num_samples: int = 1, temperature: float = 0.0, top_p: float = 1.0,
                     seed: int = 42) -> list[list[int]]:
        """Each reply's token ids (stop token excluded), conversation-major: greedy at temperature 0, in left-padded
        batches of `batch_size`; sampled otherwise, `num_samples` per conversation.

        Sampling runs one conversation at a time (its N samples are the batch) under a seed made of `seed` and the
        prompt, so an item's samples do not depend on which items share its batch or on a resumed run's order.
        """
        import torch

        if temperature > 0:
            return [reply for messages in conversations
                    for reply in self._sample(messages, max_new_tokens, num_samples, temperature, top_p, seed)]
        replies = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(conversations), self.batch_size):
            prompts = [self.template.prompt_ids(m) for m in conversations[start:start + self.batch_size]]
            width = max(len(p) for p in prompts)
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
            attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
            with torch.no_grad():
                output = self.model.generate(input_ids=input_ids, attention_mask=attention,
                                             min_new_tokens=min_new_tokens, **self.decoding_options(max_new_tokens))
            replies += [self.reply_ids(row[width:]) for row in output for _ in range(num_samples)]
        return replies

    def _sample(self, messages: list[dict[str, str]], max_new_tokens: int, num_samples: int, temperature: float,
                top_p: float, seed: int) -> list[list[int]]:
        import zlib

        import torch

        prompt = self.template.prompt_ids(messages)
        torch.manual_seed(zlib.crc32(f"{seed}:{prompt}".encode()))
        input_ids = torch.tensor([prompt], device=self.device)
        with torch.no_grad():
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         num_return_sequences=num_samples,
                                         **self.decoding_options(max_new_tokens, temperature, top_p))
        return [self.reply_ids(row[len(prompt):]) for row in output]


def openai_base_url(endpoint: str) -> str:
    """The base URL the openai client wants (ending in /v1) from any usual way of writing an endpoint: the server
    (http://host:8000), its /v1 base, or the full /v1/chat/completions URL."""
    base = endpoint.rstrip("/")
    base = base.removesuffix("/chat/completions")
    return base if base.endswith("/v1") else base + "/v1"


class EndpointBackend:
    """Any OpenAI-compatible chat endpoint (vLLM, `medtune serve`, OpenAI), through the official `openai` client;
    requests run concurrently.

    The client retries a 408, 409, 429 or 5xx reply, a timeout and a dropped connection `max_retries` times with
    exponential backoff (0.5 s doubling up to 8 s, with jitter, or the server's Retry-After up to 2 minutes). What
    still fails becomes one line naming the endpoint and what to do (exit 2).
    """

    def __init__(self, endpoint: str, model: str = "default", concurrency: int = 8, timeout: float = 600,
                 api_key: str | None = None, max_retries: int = 5, key_option: str = "--endpoint_api_key",
                 system_prompt: str | None = None):
        from openai import OpenAI

        self.url = openai_base_url(endpoint)
        self.model_name, self.concurrency, self.key_option = model, concurrency, key_option
        # A local server (vLLM, medtune serve without --api-key) takes no key, but the client insists on one.
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self.client = OpenAI(base_url=self.url, api_key=key, max_retries=max_retries, timeout=timeout)
        self.name = f"{endpoint} ({model})"
        self.system_prompt = system_prompt  # sent as the system message of conversations that have none

    def choose(self, choices):
        raise ConfigError("--mode likelihood needs a local model (logits); use --mode generate with --endpoint")

    def _one(self, messages: list[dict[str, str]], max_new_tokens: int, sampling: dict | None = None) -> str:
        """One reply: greedy (temperature 0), or sampled with `sampling` = {temperature, top_p, seed}."""
        import openai

        from medtune.templates.chat import with_system_prompt

        messages = with_system_prompt(messages, self.system_prompt)
        try:
            completion = self.client.chat.completions.create(model=self.model_name, messages=messages,
                                                             max_tokens=max_new_tokens,
                                                             **(sampling or {"temperature": 0}))
        except openai.AuthenticationError as exc:
            raise MedtuneError(f"{self.url}: HTTP 401 unauthorized ({error_text(exc)}); pass the server's key with "
                               f"{self.key_option} or OPENAI_API_KEY") from None
        except openai.APITimeoutError:
            raise MedtuneError(f"{self.url}: no reply within {self.client.timeout} s (after "
                               f"{self.client.max_retries} retries)") from None
        except openai.APIConnectionError as exc:
            raise MedtuneError(f"{self.url}: cannot connect ({exc.__cause__ or exc}); is the server running (e.g. "
                               "`medtune serve`) at that address?") from None
        except openai.APIStatusError as exc:
            raise MedtuneError(f"{self.url}: HTTP {exc.status_code} ({error_text(exc)})") from None
        try:
            return (completion.choices[0].message.content or "").strip()
        except (AttributeError, IndexError, TypeError):
            raise MedtuneError(f"{self.url}: unexpected response {str(completion)[:200]}") from None

    def generate(self, conversations, max_new_tokens: int = 512, num_samples: int = 1, temperature: float = 1.0,
                 top_p: float = 1.0, seed: int = 42) -> list[str]:
        """Replies in conversation order; with `num_samples` N > 1, N sampled replies per conversation
        (conversation-major), each its own request with seed `seed + k` (honoured by vLLM and OpenAI)."""
        if num_samples == 1:
            requests = [(m, None) for m in conversations]
        else:
            requests = [(m, {"temperature": temperature, "top_p": top_p, "seed": seed + k})
                        for m in conversations for k in range(num_samples)]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda request: self._one(request[0], max_new_tokens, request[1]), requests))


def error_text(exc) -> str:
    """The server's own error message on one line (OpenAI-style {"error": {"message"}} or the body's start)."""
    body = exc.body
    if isinstance(body, dict):
        body = (body.get("error") if isinstance(body.get("error"), dict) else body).get("message", body)
    return " ".join(str(body or exc.message).split())[:200]

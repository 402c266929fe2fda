"""What evaluation talks to: a local model folder (optionally + a LoRA adapter, unmerged) or an OpenAI-compatible
endpoint (vLLM, `medtune serve`). Both render prompts through the same ChatTemplate as training."""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import time
import urllib.error
import urllib.request
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
    multiple: bool  # any non-empty set of letters may be the answer


def answer_candidates(letters: str, multiple: bool) -> list[str]:
    """Every answer a model could give: one letter, or (multiple choice) every non-empty sorted letter set."""
    if not multiple:
        return list(letters)
    return ["".join(c) for size in range(1, len(letters) + 1) for c in itertools.combinations(letters, size)]


class LocalBackend:
    """A model folder on this machine (GPU if available), scored in batches."""

    def __init__(self, model_path: str | None, adapter: str | None = None, template: str | None = None,
                 torch_dtype: str = "auto", trust_remote_code: bool = False, batch_size: int = 8,
                 tokenizer_path: str | None = None, attn_implementation: str | None = None,
                 needs_chat_template: bool = True):
        import torch

        from medtune.models.loader import load_chat_template, load_model, load_tokenizer, resolve_model_path

        model_path = resolve_model_path(model_path)
        # An explicit --tokenizer_name_or_path wins; else an adapter trained by medtune carries the tokenizer and
        # chat template it was trained with.
        tokenizer_source = tokenizer_path or (
            adapter if adapter and (Path(adapter) / "tokenizer_config.json").is_file() else model_path)
        self.tokenizer = load_tokenizer(tokenizer_source, trust_remote_code)
        # perplexity scores raw text and needs no chat template (a base model may have none)
        self.template = load_chat_template(model_path, self.tokenizer, template) if needs_chat_template else None
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

    def _candidate_sequences(self, choice: Choice) -> tuple[list[int], list[tuple[str, list[int]]], bool]:
        """(prompt ids, [(candidate, reply ids)], whether the first reply token alone decides)."""
        names = answer_candidates(choice.letters, choice.multiple)
        prompt_text, first_reply = self.template.prompt_and_reply(choice.messages, names[0])
        if first_reply.startswith(names[0]):
            # Every candidate renders as its letters plus the same stop suffix: render the template once.
            suffix = first_reply[len(names[0]):]
            replies = [name + suffix for name in names]
        else:
            replies = [self.template.prompt_and_reply(choice.messages, name)[1] for name in names]
        tokenize = self.template.tokenizer
        candidates = [(name, tokenize(reply, add_special_tokens=False)["input_ids"]) for name, reply in zip(names, replies)]
        first_tokens = [ids[0] for _, ids in candidates]
        single_token = not choice.multiple and len(set(first_tokens)) == len(first_tokens)
        return tokenize(prompt_text, add_special_tokens=False)["input_ids"], candidates, single_token

    def choose(self, choices: list[Choice]) -> list[tuple[str, dict[str, float]]]:
        """For each question, the highest-scoring answer and every candidate's log-probability.

        Single choice: the log-probability of each option letter as the reply's first token; the prompts of a group
        of questions go through one batched forward pass. Multiple choice: the log-probability of the whole reply
        -- the sorted letters and the stop marker -- for every non-empty letter set, so the model's choice of where
        to stop counts; the prompt is run once and its KV cache shared by all candidates.
        """
        import torch

        scores: list[dict[str, float]] = [{} for _ in choices]
        single = []
        for index, choice in enumerate(choices):
            if not choice.letters:
                continue  # no option left to choose (e.g. --official dropped them all): scored as unanswered
            prompt, candidates, single_token = self._candidate_sequences(choice)
            if single_token:
                single.append((index, prompt, candidates))
            else:
                scores[index] = self._score_continuations(prompt, candidates)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(single), self.batch_size):
            batch = single[start:start + self.batch_size]
            width = max(len(prompt) for _, prompt, _ in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            attention = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (_, prompt, _) in enumerate(batch):
                # left padding puts every prompt's last token at -1, so only that position needs the output head
                input_ids[row, width - len(prompt):] = torch.tensor(prompt)
                attention[row, width - len(prompt):] = 1
            positions = (attention.cumsum(-1) - 1).clamp(min=0)  # positions as if each prompt were alone
            with torch.no_grad():
                logits = self.model(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                    position_ids=positions.to(self.device), logits_to_keep=1).logits
            for row, (index, _, candidates) in enumerate(batch):
                last = torch.log_softmax(logits[row, -1].float(), dim=-1)
                scores[index] = {candidate: last[reply[0]].item() for candidate, reply in candidates}
        return [(max(s, key=s.get) if s else "", s) for s in scores]

    def _score_continuations(self, prompt: list[int], candidates: list[tuple[str, list[int]]]) -> dict[str, float]:
        """Sum of log-probabilities of each candidate reply after `prompt`, sharing the prompt's KV cache."""
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([prompt], device=self.device), use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            totals = {name: first[reply[0]].item() for name, reply in candidates}
            width = max(len(reply) for _, reply in candidates) - 1
            if width <= 0:
                return totals
            cache = out.past_key_values
            cache.batch_repeat_interleave(len(candidates))
            pad = self.tokenizer.pad_token_id
            inputs = torch.full((len(candidates), width), pad, dtype=torch.long)
            attention = torch.ones((len(candidates), len(prompt) + width), dtype=torch.long)
            for row, (_, reply) in enumerate(candidates):
                fed = reply[:-1]  # each reply token is predicted from the ones before it
                inputs[row, :len(fed)] = torch.tensor(fed, dtype=torch.long)
                attention[row, len(prompt) + len(fed):] = 0
            positions = torch.arange(len(prompt), len(prompt) + width).expand(len(candidates), -1)
            logits = self.model(input_ids=inputs.to(self.device), attention_mask=attention.to(self.device),
                                position_ids=positions.to(self.device), past_key_values=cache).logits.float()
            log_probs = torch.log_softmax(logits, dim=-1)
            for row, (name, reply) in enumerate(candidates):
                for k, token in enumerate(reply[1:]):
                    totals[name] += log_probs[row, k, token].item()
        return totals

    # -- generation ---------------------------------------------------------------------------------------------

    def generate(self, conversations: list[list[dict[str, str]]], max_new_tokens: int = 512,
                 min_new_tokens: int = 0, num_samples: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                 seed: int = 42) -> list[str]:
        """Replies in conversation order: greedy, in left-padded batches (`min_new_tokens` only for benchmarks); or,
        with `num_samples` N > 1, N sampled replies per conversation (conversation-major, as `num_return_sequences`).

        Sampling runs one conversation at a time (its N samples are the batch) under a seed made of `seed` and the
        prompt, so an item's samples do not depend on which items share its batch or on a resumed run's order.
        """
        import torch

        if num_samples > 1:
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
                output = self.model.generate(input_ids=input_ids, attention_mask=attention, do_sample=False,
                                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                             eos_token_id=self.template.stop_token_ids, pad_token_id=pad)
            replies += [self.tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]
        return replies

    def _sample(self, messages: list[dict[str, str]], max_new_tokens: int, num_samples: int, temperature: float,
                top_p: float, seed: int) -> list[str]:
        import zlib

        import torch

        prompt = self.template.prompt_ids(messages)
        torch.manual_seed(zlib.crc32(f"{seed}:{prompt}".encode()))
        input_ids = torch.tensor([prompt], device=self.device)
        with torch.no_grad():
            output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         do_sample=True, temperature=temperature, top_p=top_p,
                                         num_return_sequences=num_samples, max_new_tokens=max_new_tokens,
                                         eos_token_id=self.template.stop_token_ids,
                                         pad_token_id=self.tokenizer.pad_token_id)
        return [self.tokenizer.decode(row[len(prompt):], skip_special_tokens=True).strip() for row in output]


class EndpointBackend:
    """Any OpenAI-compatible chat endpoint; requests run concurrently."""

    def __init__(self, endpoint: str, model: str = "default", concurrency: int = 8, timeout: float = 600,
                 api_key: str | None = None):
        base = endpoint.rstrip("/")
        if base.endswith("/chat/completions"):
            self.url = base
        elif base.endswith("/v1"):  # the usual OpenAI base-URL form
            self.url = base + "/chat/completions"
        else:
            self.url = base + "/v1/chat/completions"
        self.model_name, self.concurrency, self.timeout, self.api_key = model, concurrency, timeout, api_key
        self.attempts = 3
        self.name = f"{endpoint} ({model})"

    def choose(self, choices):
        raise ConfigError("--mode likelihood needs a local model (logits); use --mode generate with --endpoint")

    def _one(self, messages: list[dict[str, str]], max_new_tokens: int, sampling: dict | None = None) -> str:
        """One reply: greedy (temperature 0), or sampled with `sampling` = {temperature, top_p, seed}."""
        body = json.dumps({"model": self.model_name, "messages": messages, "max_tokens": max_new_tokens,
                           **(sampling or {"temperature": 0})}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers)
        for attempt in range(self.attempts):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    payload = json.loads(response.read())
                break
            except urllib.error.HTTPError as exc:
                if exc.code < 500 or attempt == self.attempts - 1:  # a client error will not fix itself
                    raise MedtuneError(f"{self.url}: HTTP {exc.code} {exc.reason}") from None
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:  # resets, timeouts, bad JSON
                if attempt == self.attempts - 1:
                    raise MedtuneError(f"{self.url}: request failed after {self.attempts} attempts ({exc})") from None
            time.sleep(2 ** attempt)
        try:
            return (payload["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError):
            raise MedtuneError(f"{self.url}: unexpected response {str(payload)[:200]}") from None

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
